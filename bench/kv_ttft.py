"""Time to first token with activation memory, cold versus warm, through the HTTP API.

    python bench/kv_ttft.py [--sizes 512 1024 2048] [--warm-runs 5]

For each block size, one user's cube gets pinned memories whose activation block
takes about that many tokens of the embedded model. The first streaming request
computes the block (cold: a miss, the whole prefix prefilled); the next ones
restore its saved KV state (warm: a hit from the RAM tier). One more request after
the RAM tier is emptied restores from the disk tier (the file read and its CRC
check count in that restore's time). ``ram_tier_mb``: the RAM tier after each size
(the states of all sizes so far). TTFT is the time from sending
the request to the first content chunk, with the openai SDK. Retrieval is off
(``top_k: 0``) and nothing is written back, so every request has the same prompt.
Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import offline  # noqa: E402

offline.configure()

from proxy.app import create_app  # noqa: E402
from proxy.backends.llamacpp import LlamaCppBackend  # noqa: E402
from proxy.backends.stats import Timing  # noqa: E402
from proxy.settings import ActivationSettings, ModelConfig, Settings  # noqa: E402
from proxy.testing.live import Live, serve  # noqa: E402

QUESTION = [{"role": "user", "content": "Which city did I say I was born in?"}]
FACTS = ["likes {a} tea", "was born in {c}", "keeps a {p} named {n}", "plays the {i} on Sundays",
         "works as a {j}", "visited {c} in spring", "reads books about {t}"]
WORDS = {"a": ["green", "black", "mint", "jasmine"], "c": ["Lisbon", "Oslo", "Quito", "Hanoi"],
         "p": ["cat", "dog", "parrot"], "n": ["Miso", "Biscuit", "Pepper"],
         "i": ["cello", "piano", "drums"], "j": ["nurse", "carpenter", "pilot"],
         "t": ["astronomy", "gardening", "history"]}


def log(msg: str) -> None:
    print(f"[kv_ttft] {msg}", file=sys.stderr, flush=True)


def fact(n: int) -> str:
    template = FACTS[n % len(FACTS)]
    fields = {k: v[(n // len(FACTS)) % len(v)] for k, v in WORDS.items()}
    return f"Note {n}: the user " + template.format(**fields) + "."


def backend(live: Live) -> LlamaCppBackend:
    b = live.context.backends["local"]
    assert isinstance(b, LlamaCppBackend)
    return b


def fill(client: httpx.Client, live: Live, user: str, size: int) -> int:
    """Pin memories until the user's block takes about ``size`` tokens; its size."""
    b = backend(live)
    frame = b.count_tokens("<memories>\n" + "x" * 300 + "\n\n</memories>")  # preamble, roughly
    texts: list[str] = []
    used = frame
    n = 0
    while True:
        cost = b.count_tokens(f"- [2026-01-01] {fact(n)}\n")
        if used + cost > size - 8:
            break
        texts.append(fact(n))
        used += cost
        n += 1
    r = client.post("/memories", json={"items": [
        {"user": user, "text": t, "pinned": True} for t in texts]})
    r.raise_for_status()
    return used


def ttft(live: Live, user: str) -> tuple[float, str, str]:
    c = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    raw = c.chat.completions.with_raw_response.create(
        model="local", messages=QUESTION, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        extra_headers={"x-memcube-user": user},
        extra_body={"memory": {"top_k": 0, "write": False}})
    first = None
    text = []
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
    assert first is not None, "no content"
    return first, raw.headers["x-memcube-activation"], "".join(text)


def restore_delta(live: Live, before: Timing) -> float:
    after = backend(live).activation.restore_seconds
    return (after.seconds - before.seconds) / max(1.0, after.count - before.count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--warm-runs", type=int, default=5)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="kv-ttft-"))
    settings = Settings(data_dir=data_dir,
                        models=[ModelConfig(name="local", backend="llamacpp", n_ctx=4096)],
                        activation=ActivationSettings(max_tokens=max(args.sizes),
                                                      refresh_seconds=3600))
    results: dict[str, Any] = {}
    log("starting the proxy (embedded model, Qdrant Edge, MiniLM)")
    with serve(create_app(settings)) as live, httpx.Client(base_url=live.base_url,
                                                            timeout=600) as client:
        ttft(live, "warmup")  # load everything once; no block for this user
        for size in args.sizes:
            user = f"user-{size}"
            tokens = fill(client, live, user, size)
            log(f"block of about {tokens} tokens: cold request")
            cold, state, cold_text = ttft(live, user)
            assert state == "miss", state
            warm, restores = [], []
            for _ in range(args.warm_runs):
                before = replace(backend(live).activation.restore_seconds)
                t, state, text = ttft(live, user)
                assert state == "hit" and text == cold_text, (state, text, cold_text)
                warm.append(t)
                restores.append(restore_delta(live, before))
            states = backend(live).states
            assert states is not None
            state_bytes = states.ram_used()
            states._ram.clear()  # noqa: SLF001 - empty the RAM tier: the next hit is from disk
            states._ram_used = 0  # noqa: SLF001
            before = replace(backend(live).activation.restore_seconds)
            disk, state, text = ttft(live, user)
            assert state == "hit" and text == cold_text
            disk_restore = restore_delta(live, before)
            warm_p50 = statistics.median(warm)
            results[str(size)] = {
                "block_tokens": tokens, "cold_ttft_s": round(cold, 3),
                "warm_ttft_s": round(warm_p50, 4), "warm_over_cold": round(warm_p50 / cold, 4),
                "restore_ms": round(statistics.median(restores) * 1000, 2),
                "disk_ttft_s": round(disk, 4), "disk_restore_ms": round(disk_restore * 1000, 2),
                "ram_tier_mb": round(state_bytes / 1e6, 1)}
            log(f"{size}: cold {cold:.2f}s, warm {warm_p50:.3f}s "
                f"({warm_p50 / cold:.1%}), restore {results[str(size)]['restore_ms']} ms")
    top = results[str(max(args.sizes))]
    print(json.dumps({"bench": "kv_ttft", "model": "SmolLM2-135M-Instruct Q4_1",
                      "sizes": results, "warm_over_cold_at_max": top["warm_over_cold"],
                      "target_met": top["warm_over_cold"] <= 0.03 and top["restore_ms"] < 100}))


if __name__ == "__main__":
    main()
