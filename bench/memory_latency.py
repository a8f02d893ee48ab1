"""Retrieval-plus-injection latency and write-back throughput at 1k, 10k and 100k memories.

    python bench/memory_latency.py [--sizes 1000,10000,100000] [--queries 200]

Real components: MiniLM through llama.cpp, Qdrant Edge on disk, the SQLite outbox.
For each size, one tenant's store is filled to that many memories, then:
- recall: ``MemoryService.recall`` (embed the query, dense + BM25 search, fuse, pack
  the block with tiktoken) for ``--queries`` questions: p50/p95;
- write-back: ``remember`` of ``--writes`` exchanges (fast mode) and ``flush``: memories/s
  from the first append to the last upsert, for user turns of one to three sentences
  (``writeback_per_s``) and of one sentence (``writeback_one_sentence_per_s``, no
  pieces: the embedding work of a store without them);
- then a restart: the store is closed and opened again, which builds Qdrant Edge's
  search index over what was written (``reopen_s``), and both are measured again
  (``after_restart``). The first figures are a long-running process's worst case
  (everything written since its start is searched by a full scan), the second a
  freshly started one's.
Memories are one to three sentences (LoCoMo turns average about three), so the store
keeps a vector per sentence piece as well (``memory.pieces``). Filling 100k memories
by embedding each would take minutes, so the fill embeds a pool of 2,000 distinct
sentences and stores the rest as noisy copies of their vectors, pieces included
(texts stay distinct, so BM25 sees a real index). Write-back embeds for real.
Progress on stderr; one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import offline  # noqa: E402

offline.configure()

import numpy as np  # noqa: E402

from memory.embedding.minilm import MiniLMEmbedder  # noqa: E402
from memory.inject import tiktoken_counter  # noqa: E402
from memory.layer import Turn  # noqa: E402
from memory.models import MemoryItem, default_cube_id  # noqa: E402
from memory.outbox import Outbox  # noqa: E402
from memory.pieces import pieces  # noqa: E402
from memory.service import MemoryConfig, MemoryService  # noqa: E402
from memory.store.edge import EdgeStore  # noqa: E402
from memory.store.guard import GuardedStore  # noqa: E402

PEOPLE = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun"]
VERBS = ["visited", "painted", "cooked", "read about", "bought", "planned a trip to",
         "wrote a poem about", "adopted", "photographed", "learned about"]
THINGS = ["Lisbon", "a sunrise", "ramen", "the Roman empire", "a red bicycle", "Kyoto",
          "the ocean", "a tabby cat", "old bridges", "jazz piano", "mountain lakes", "tulips",
          "chess openings", "a vintage camera", "desert stars", "sourdough", "sea turtles",
          "glass art", "marathon training", "birdsong"]
WHEN = ["last week", "in May", "yesterday", "on her birthday", "after work", "in 2022",
        "during the holidays", "on Sunday", "with friends", "alone"]


def log(msg: str) -> None:
    print(f"[memory_latency] {msg}", file=sys.stderr, flush=True)


def sentence(rng: random.Random, n: int) -> str:
    return (f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} {rng.choice(THINGS)} "
            f"{rng.choice(WHEN)} (note {n}).")


def memory_text(rng: random.Random, n: int) -> str:
    return " ".join(sentence(rng, n) for _ in range(rng.randint(1, 3)))


def noisy(pool: np.ndarray, k: int, rng: random.Random, seed: int) -> np.ndarray:
    base = pool[rng.choices(range(len(pool)), k=k)]
    out = base + np.random.default_rng(seed).normal(0, 0.02, base.shape)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def fill(store: EdgeStore, embedder: MiniLMEmbedder, tenant: str, user: str, size: int,
         start: int, rng: random.Random, pool: np.ndarray) -> None:
    cube = default_cube_id(tenant, user)
    for lo in range(start, size, 1000):
        hi = min(size, lo + 1000)
        items = [MemoryItem(id=f"00000000-0000-4000-8000-{n:012d}", tenant=tenant, cube_id=cube,
                            user=user, text=memory_text(rng, n)) for n in range(lo, hi)]
        counts = [len(pieces(i.text)) for i in items]
        vectors = noisy(pool, len(items), rng, lo).tolist()
        flat = noisy(pool, sum(counts), rng, 10**9 + lo).tolist()
        split = [flat[sum(counts[:j]):sum(counts[:j + 1])] for j in range(len(items))]
        store.upsert(items, vectors, split)
        if hi % 10000 == 0 or hi == size:
            log(f"filled {hi}/{size}")


async def measure(service: MemoryService, queries: list[str], writes: int,
                  tenant: str, user: str, rng: random.Random) -> dict[str, float]:
    latencies = []
    for n, q in enumerate(queries):
        turn = Turn(request_id=f"q{n}", tenant=tenant, user=user, session_id=None, model="m")
        t0 = time.perf_counter()
        await service.recall(turn, [{"role": "user", "content": q}])
        latencies.append((time.perf_counter() - t0) * 1000)
    rates: dict[str, float] = {}
    for name, text in (("writeback_per_s", memory_text), ("writeback_one_sentence_per_s", sentence)):
        t0 = time.perf_counter()
        for n in range(writes):
            turn = Turn(request_id=f"w{rng.random()}", tenant=tenant, user=user, session_id="s",
                        model="m")
            await service.remember(turn, [{"role": "user", "content": text(rng, 10**9 + n)}], "ok")
        await service.flush()
        rates[name] = round(writes / (time.perf_counter() - t0), 1)
    pct = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"recall_p50_ms": round(pct[49], 2), "recall_p95_ms": round(pct[94], 2), **rates}


async def main(args: argparse.Namespace) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="memcube-latency-"))
    t0 = time.perf_counter()
    embedder = MiniLMEmbedder(data / "models")
    log(f"embedder ready in {time.perf_counter() - t0:.1f}s")
    rng = random.Random(7)
    pool_texts = [sentence(rng, 10**8 + i) for i in range(2000)]
    pool = np.array(embedder.embed(pool_texts), dtype=np.float32)
    log("embedded the pool of 2000 sentences")

    def open_service() -> MemoryService:
        store = EdgeStore(data / "qdrant", embedding_model=embedder.model_id, dim=embedder.dim)
        return MemoryService(store=store, embedder=embedder, outbox=Outbox(data / "outbox.db"),
                             config=MemoryConfig(), counter_for=lambda m: tiktoken_counter())

    service = open_service()
    await service.start()
    tenant, user = "bench", "u1"
    queries = [f"What did {rng.choice(PEOPLE)} do with {rng.choice(THINGS)}?"
               for _ in range(args.queries)]
    results: dict[str, object] = {}
    have = 0
    for size in args.sizes:
        t0 = time.perf_counter()
        edge = service.store.inner if isinstance(service.store, GuardedStore) else service.store
        assert isinstance(edge, EdgeStore)
        fill(edge, embedder, tenant, user, size, have, rng, pool)
        have = size
        log(f"size {size}: filled in {time.perf_counter() - t0:.1f}s; measuring")
        figures: dict[str, object] = dict(
            await measure(service, queries, args.writes, tenant, user, rng))
        have += 2 * args.writes
        log(f"size {size}: {figures}; restarting")
        await service.stop()
        service.outbox.close()
        service.store.close()
        t0 = time.perf_counter()
        service = open_service()
        figures["reopen_s"] = round(time.perf_counter() - t0, 2)
        await service.start()
        figures["after_restart"] = await measure(service, queries, args.writes, tenant, user, rng)
        have += 2 * args.writes
        results[str(size)] = figures
        log(f"size {size}: {figures}")
    await service.stop()
    service.outbox.close()
    service.store.close()
    embedder.close()
    return {"bench": "memory_latency", "queries": args.queries, "writes": args.writes,
            "embedder": embedder.model_id, **results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--writes", type=int, default=500)
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
