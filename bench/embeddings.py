"""Embeddings: the embedded MiniLM's vectors/s through the proxy and directly, and the
latency the relay adds to an upstream's embeddings.

Starts the scripted fake upstream and the proxy (``memcube-proxy serve``, memory off)
as separate processes, then, from this process, one client at a time:

* **local**: vectors/s at 1, 16 and 64 texts per call, through the proxy over real HTTP
  with the openai SDK (its default ``encoding_format: base64``), and with
  ``MiniLMEmbedder.embed`` called in this process, side by side (the same texts, the
  same number of threads, never both at once), so the HTTP overhead is visible;
* **relayed**: the p50 of ``embeddings.create`` against the fake upstream directly and
  through the proxy (direct transport, and litellm for reference), one text per call,
  rounds alternated so both are measured under the same conditions.

    python bench/embeddings.py [--texts 256] [--requests 300] [--rounds 3]

Progress goes to stderr; one JSON line of figures to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memory import offline  # noqa: E402

offline.configure()

MINILM = "all-minilm-l6-v2"
BATCHES = (1, 16, 64)
WORDS = ("the a my our their team user model memory cache server client request reply "
         "quick slow bright quiet long short early late new old small large busy calm "
         "reads writes keeps finds sends moves builds checks answers remembers forgets "
         "today yesterday tomorrow morning evening city river garden office kitchen "
         "Lisbon Paris Tokyo Alice Bob coffee music weather train book letter").split()


def log(msg: str) -> None:
    print(f"[embeddings] {msg}", file=sys.stderr, flush=True)


def corpus(n: int, seed: int = 7) -> list[str]:
    """Sentences of 8 to 24 words: chat-turn sized, like what applications embed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "."
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "proxy.testing.fake_upstream"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"


def start_proxy(upstream: str, work: Path, models: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "bench.yaml"
    config.write_text(json.dumps({
        "port": port, "data_dir": str(work / "data"), "log_level": "warning",
        "memory": {"enabled": False, "embedder": {"cache_dir": str(models)}},
        "models": [
            {"name": "direct", "backend": "litellm", "model": "openai/fake-model",
             "api_base": upstream, "max_retries": 0},
            {"name": "litellm", "backend": "litellm", "model": "openai/fake-model",
             "api_base": upstream, "max_retries": 0, "transport": "litellm"},
        ],
    }))
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, f"{url}/v1"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("proxy did not become healthy")


def rate(embed: Callable[[list[str]], object], texts: list[str], batch: int) -> dict[str, float]:
    """Vectors/s and the p50 of one call, embedding ``texts`` ``batch`` at a time."""
    calls = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    embed(calls[0])  # warm
    took: list[float] = []
    start = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        embed(call)
        took.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {"vectors_per_s": len(texts) / elapsed, "p50_ms": statistics.median(took) * 1000}


def median_of(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}


def local_figures(sdk: openai.OpenAI, models: Path, texts: list[str],
                  rounds: int) -> dict[str, Any]:
    """Per batch size, rounds alternate proxy and embedder; each figure is the median
    over the rounds (other work on the machine hits both alike)."""
    from memory.embedding.minilm import MiniLMEmbedder

    embedder = MiniLMEmbedder(models)
    out: dict[str, Any] = {}
    try:
        for batch in BATCHES:
            n = len(texts) if batch > 1 else max(32, len(texts) // 4)
            proxied, direct = [], []
            for _ in range(rounds):
                proxied.append(rate(lambda c: sdk.embeddings.create(model=MINILM, input=c),
                                    texts[:n], batch))
                direct.append(rate(embedder.embed, texts[:n], batch))
            p, d = median_of(proxied), median_of(direct)
            out[f"batch_{batch}"] = {"proxy": p, "embedder": d,
                                     "http_overhead_ms_per_call": round(p["p50_ms"] - d["p50_ms"], 2)}
            log(f"local batch {batch}: proxy {p['vectors_per_s']}/s (p50 {p['p50_ms']} ms), "
                f"embedder {d['vectors_per_s']}/s (p50 {d['p50_ms']} ms)")
    finally:
        embedder.close()
    return out


def p50s(make: Callable[[], object], requests: int) -> float:
    took = []
    for _ in range(requests):
        t0 = time.perf_counter()
        make()
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1000


def relay_figures(upstream: str, proxy: str, requests: int, rounds: int) -> dict[str, Any]:
    body = {"input": "Say hello to the relay."}
    clients = {"upstream": (openai.OpenAI(base_url=upstream, api_key="k", max_retries=0),
                            "fake-model")}
    for model in ("direct", "litellm"):
        clients[model] = (openai.OpenAI(base_url=proxy, api_key="k", max_retries=0), model)
    figures: dict[str, list[float]] = {name: [] for name in clients}
    for client, model in clients.values():  # warm connections and code paths
        p50s(lambda c=client, m=model: c.embeddings.create(model=m, **body), 30)
    for r in range(rounds):
        for name, (client, model) in clients.items():
            figures[name].append(p50s(lambda c=client, m=model: c.embeddings.create(model=m, **body),
                                      requests))
        log(f"relay round {r + 1}/{rounds}: " + ", ".join(
            f"{name} p50 {values[-1]:.2f} ms" for name, values in figures.items()))
    base = statistics.median(figures["upstream"])
    out: dict[str, Any] = {"upstream_p50_ms": round(base, 3)}
    for name in ("direct", "litellm"):
        p50 = statistics.median(figures[name])
        out[name] = {"p50_ms": round(p50, 3), "added_p50_ms": round(p50 - base, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=256, help="texts per local batch row")
    parser.add_argument("--requests", type=int, default=300, help="relayed requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", type=Path, default=REPO / "data" / "models",
                        help="where MiniLM is converted to (reused when there)")
    args = parser.parse_args()
    texts = corpus(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        up_proc, upstream = start_upstream()
        proxy_proc, proxy = start_proxy(upstream, Path(tmp), args.models)
        try:
            sdk = openai.OpenAI(base_url=proxy, api_key="k", max_retries=0, timeout=120)
            log("local MiniLM: through the proxy and directly")
            local = local_figures(sdk, args.models, texts, args.rounds)
            log("relayed embeddings: upstream directly and through the proxy")
            relayed = relay_figures(upstream, proxy, args.requests, args.rounds)
        finally:
            proxy_proc.terminate()
            up_proc.terminate()
            proxy_proc.wait(30)
            up_proc.wait(30)
    print(json.dumps({"bench": "embeddings", "texts": args.texts, "local": local,
                      "relayed_1_client": relayed}))


if __name__ == "__main__":
    main()
