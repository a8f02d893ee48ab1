"""Fine extraction with the embedded model: what a turn costs and what a chat waits.

    python bench/fine_extraction.py [--exchanges 5] [--threads N]

Real components: the embedded SmolLM2-135M through llama.cpp, MiniLM, Qdrant Edge,
the outbox; one proxy (``memory.extraction: fine``, ``extraction_model: local``, the
default bounds) on loopback, driven over HTTP.

- ``tokens_per_s``: decode speed of the local model on the facts prompt (tokens after
  the first, over their time), free text (``none``, end tokens banned so it runs to
  ``max_tokens``), any JSON object (``json_object``) and the facts schema
  (``facts_schema``): what sampling under a grammar costs.
- ``extraction_s``: per exchange, the seconds from the exchange's acknowledgement to
  its write-back (``POST /v1/memories/flush``): the facts call, and a decision call
  per fact that has similar memories already; ``extractors``: what produced the
  memories (``fine``; ``fast`` would be the raw fallback).
- ``chat_alone_s`` and ``chat_during_extraction_s``: one short chat (8 tokens) on its
  own, and issued while an extraction call runs: it waits for that call only.
- ``shutdown_s``: stopping the proxy while an extraction runs.
Progress on stderr; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import offline  # noqa: E402

offline.configure()

import httpx  # noqa: E402
from llama_cpp import LlamaGrammar  # noqa: E402
from llama_cpp.llama_grammar import JSON_GBNF  # noqa: E402

from memory.extract import FACTS_PROMPT, facts_format  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.backends.llamacpp import LlamaCppBackend  # noqa: E402
from proxy.backends.llamacpp.grammar import response_grammar  # noqa: E402
from proxy.settings import EmbedderSettings, MemorySettings, ModelConfig, Settings  # noqa: E402
from proxy.testing.live import Live, serve  # noqa: E402

TOLD = ["My sister Ana lives in Porto and I play the cello every Sunday.",
        "I'm allergic to peanuts, so please never suggest satay.",
        "We moved to Lisbon in March 2023; I work at a bakery near the river.",
        "My daughter Maya turns seven on 14 June and loves dinosaurs.",
        "I prefer answers in Portuguese when we talk about food.",
        "Ana moved from Porto to Braga last month.",
        "I gave up the cello; now I play the piano on Sundays."]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def local(live: Live) -> LlamaCppBackend:
    backend = live.context.backends["local"]
    assert isinstance(backend, LlamaCppBackend)
    return backend


def decode_speed(live: Live, gbnf: str | None, max_tokens: int) -> dict[str, float]:
    """Tokens/s after the first token, on the facts prompt, from a cleared context."""
    backend = local(live)
    convo = f"user: {TOLD[0]}\nassistant: Nice!"
    tokens, kwargs, _ = backend.prepare({"messages": [
        {"role": "system", "content": FACTS_PROMPT}, {"role": "user", "content": convo}],
        "temperature": 0, "max_tokens": max_tokens})
    if gbnf is None:
        kwargs["logit_bias"] = {t: -100.0 for t in backend.end_token_ids()}
    else:
        kwargs["grammar"] = LlamaGrammar.from_string(gbnf, verbose=False)

    def run(llm: Any) -> dict[str, float]:
        n, first = 0, 0.0
        for _ in llm.create_completion(tokens, stream=True, **kwargs):
            n += 1
            if n == 1:
                first = time.perf_counter()
        took = time.perf_counter() - first
        return {"tokens": n - 1, "tokens_per_s": round((n - 2) / took, 1) if n > 2 else 0.0}

    return live.call(backend.run_cleared(run), timeout=600)


def chat(live: Live, text: str, *, user: str = "alice", memory: bool = True) -> float:
    start = time.perf_counter()
    r = httpx.post(f"{live.base_url}/chat/completions", timeout=600,
                   headers={"x-memcube-user": user},
                   json={"model": "local", "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "user", "content": text}],
                         "memory": {"enabled": memory, "write": memory}})
    r.raise_for_status()
    return time.perf_counter() - start


def flush(live: Live) -> float:
    start = time.perf_counter()
    httpx.post(f"{live.base_url}/memories/flush", timeout=3600).raise_for_status()
    return time.perf_counter() - start


class ExtractionWatch:
    """Sets ``running`` while the local model generates under a grammar (extraction)."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self.running = threading.Event()
        original = backend._completion

        def completion(tokens: list[int], kwargs: dict[str, Any]) -> Iterator[Any]:
            grammar = kwargs.get("grammar") is not None
            for i, out in enumerate(original(tokens, kwargs)):
                if grammar and i == 0:
                    self.running.set()
                yield out
            if grammar:
                self.running.clear()

        backend._completion = completion  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exchanges", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path("data/models")
        settings = Settings(
            data_dir=Path(tmp) / "data",
            models=[ModelConfig(name="local", backend="llamacpp", n_ctx=2048,
                                n_threads=args.threads)],
            memory=MemorySettings(extraction="fine", extraction_model="local",
                                  embedder=EmbedderSettings(cache_dir=models if models.is_dir()
                                                            else None)))
        out: dict[str, Any] = {"bench": "fine_extraction",
                               "extraction_max_tokens": settings.memory.extraction_max_tokens}
        with serve(create_app(settings)) as live:
            backend = local(live)
            speeds = {}
            for name, gbnf in (("none", None), ("json_object", JSON_GBNF),
                               ("facts_schema", response_grammar(
                                   {"response_format": facts_format(5)}))):
                speeds[name] = decode_speed(live, gbnf, 256)
                log(f"decode {name}: {speeds[name]}")
            out["tokens_per_s"] = speeds
            watch = ExtractionWatch(backend)
            chat(live, "Hello!", user="warmup", memory=False)
            alone = [chat(live, "Name a colour.", user="bob", memory=False) for _ in range(3)]
            out["chat_alone_s"] = round(statistics.median(alone), 2)
            per: list[float] = []
            for text in TOLD[: args.exchanges]:
                chat(live, text)
                per.append(flush(live))
                log(f"extraction of {text[:30]!r}: {per[-1]:.1f} s")
            out["extraction_s"] = {"per_exchange": [round(s, 1) for s in per],
                                   "median": round(statistics.median(per), 1), "max": round(max(per), 1)}
            items = httpx.get(f"{live.base_url}/memories", params={"user": "alice"},
                              timeout=60).json()["data"]
            out["memories"] = len(items)
            out["extractors"] = sorted({i["extractor"] for i in items})
            waits = []
            for text in TOLD[args.exchanges: args.exchanges + 2] or TOLD[:2]:
                chat(live, text, user="carol")
                watch.running.wait(600)
                waits.append(chat(live, "Name a colour.", user="bob", memory=False))
                flush(live)
            out["chat_during_extraction_s"] = [round(w, 2) for w in waits]
            chat(live, TOLD[0], user="dave")
            watch.running.wait(600)
            stopping = time.perf_counter()
        out["shutdown_s"] = round(time.perf_counter() - stopping, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
