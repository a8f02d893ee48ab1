"""Evidence recall of memory search on LoCoMo conversations, with no LLM in the loop.

    python bench/locomo_recall.py locomo10.json --first 5

The data is LoCoMo's (Maharana et al., 2024; CC BY-NC 4.0), not shipped here: download
``data/locomo10.json`` from https://github.com/snap-research/locomo. Its first five
conversations (conv-26, -30, -41, -42, -43) are the dev half the README's figures use.

Every turn of every conversation goes in through the memory API (bulk POST
/v1/memories; fast mode: one memory per turn, the session's date as its time, the
turn's dia_id as provenance), one user per conversation. Every question of
categories 1-4 is then asked through POST /v1/memories/search; recall@k is the
fraction of a question's evidence turns among the sources of the top k results.
Also reported: the mean tokens of the memory block that would be injected.
Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import offline  # noqa: E402

offline.configure()

from memory.inject import build_block, tiktoken_counter  # noqa: E402
from memory.models import MemoryItem  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.settings import MemorySettings, ModelConfig, Settings  # noqa: E402
from proxy.testing.live import serve  # noqa: E402

KS = (5, 10, 20)
CATEGORIES = (1, 2, 3, 4)


def log(msg: str) -> None:
    print(f"[locomo] {msg}", file=sys.stderr, flush=True)


def session_time(text: str) -> int:
    when = datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y")
    return int(when.replace(tzinfo=UTC).timestamp())


def turns(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    n = 1
    while f"session_{n}" in conversation:
        at = session_time(conversation[f"session_{n}_date_time"])
        before = None
        for turn in conversation[f"session_{n}"]:
            text = f"{turn['speaker']}: {turn['text']}"
            if turn.get("blip_caption"):
                text += f" [shares a photo: {turn['blip_caption']}]"
            # The context of a turn is the one it answers, as fast mode records the
            # assistant message a user turn replies to.
            out.append({"text": text, "context": before, "dia_id": turn["dia_id"],
                        "session": f"session_{n}", "at": at})
            before = text
        n += 1
    return out


def evidence_ids(evidence: list[str]) -> set[str]:
    ids: set[str] = set()
    for entry in evidence:
        ids.update(re.findall(r"D\d+:\d+", entry))
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--data-dir", type=Path, help="keep the store here (default: a temp dir)")
    parser.add_argument("--first", type=int, default=None,
                        help="only the first N conversations (5: the dev half of locomo10.json)")
    args = parser.parse_args()
    conversations = json.loads(args.path.read_text())[:args.first]
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="memcube-locomo-"))
    settings = Settings(data_dir=data_dir, models=[ModelConfig(name="local", backend="llamacpp")],
                        memory=MemorySettings(enabled=True))
    count = tiktoken_counter()
    hits_at = {k: {c: [] for c in CATEGORIES} for k in KS}  # type: dict[int, dict[int, list[float]]]
    block_tokens: list[int] = []
    search_ms: list[float] = []
    with serve(create_app(settings)) as live, httpx.Client(base_url=live.base_url,
                                                            timeout=300) as client:
        service = live.context.memory_service()
        top_k = service.config.top_k
        budget = service.config.max_tokens
        start = time.perf_counter()
        total_turns = 0
        for number, conv in enumerate(conversations, 1):
            user = conv["sample_id"]
            rows = turns(conv["conversation"])
            for i in range(0, len(rows), 200):
                batch = rows[i:i + 200]
                r = client.post("/memories", json={"items": [
                    {"text": t["text"], "context": t["context"], "user": user, "type": "raw",
                     "created_at": t["at"],
                     "sources": [{"ref": t["dia_id"], "session_id": t["session"],
                                  "role": "user", "at": t["at"]}]} for t in batch]})
                r.raise_for_status()
            total_turns += len(rows)
            log(f"ingested conversation {number}/{len(conversations)} ({len(rows)} turns)")
        ingest_s = time.perf_counter() - start
        questions = [(conv["sample_id"], q) for conv in conversations for q in conv["qa"]
                     if q.get("category") in CATEGORIES and q.get("evidence")]
        for n, (user, qa) in enumerate(questions, 1):
            t0 = time.perf_counter()
            r = client.post("/memories/search", json={"query": qa["question"], "user": user,
                                                      "top_k": max(KS)})
            search_ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            results = r.json()["data"]
            wanted = evidence_ids(qa["evidence"])
            for k in KS:
                found = {s["ref"] for m in results[:k] for s in m["sources"]}
                hits_at[k][qa["category"]].append(len(wanted & found) / len(wanted))
            items = [MemoryItem(tenant="default", **{f: m[f] for f in (
                "id", "cube_id", "user", "text", "type", "created_at")}) for m in results[:top_k]]
            block, _ = build_block(items, budget, count)
            block_tokens.append(count(block) if block else 0)
            if n % 200 == 0:
                log(f"asked {n}/{len(questions)} questions")

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4) if xs else 0.0

    search_ms.sort()
    report = {
        "bench": "locomo_recall", "conversations": len(conversations), "turns": total_turns,
        "questions": len(questions), "ingest_s": round(ingest_s, 2),
        "ingest_per_s": round(total_turns / ingest_s, 1),
        "search_p50_ms": round(search_ms[len(search_ms) // 2], 2),
        **{f"recall@{k}": mean([x for c in CATEGORIES for x in hits_at[k][c]]) for k in KS},
        "by_category": {str(c): {f"recall@{k}": mean(hits_at[k][c]) for k in KS} | {
            "questions": len(hits_at[KS[0]][c])} for c in CATEGORIES},
        "mean_injected_tokens": mean([float(t) for t in block_tokens]),
        "top_k_injected": top_k,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
