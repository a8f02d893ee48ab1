"""The short form of bench/load.py: concurrent streaming clients through a real proxy.

The same code as the benchmark (imported, not copied): the fast fake upstream and
``memcube-proxy serve`` as their own processes, memory on (Qdrant Edge, MiniLM, fast
extraction), 20 clients speaking for 4 users, streaming chats for a few seconds. Speed
is the benchmark's business; this pins what must hold under load whatever the speed:
no request fails, every stream ends with ``[DONE]``, recall injects only the asking
user's memories, and write-back keeps up: after a flush every exchange is stored
exactly once, with its provenance, and the outbox is empty.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from bench.load import (
    REPLY,
    Options,
    Run,
    check_stored,
    drive,
    flush,
    list_memories,
    outbox_state,
    stack,
    summarize,
)

pytestmark = pytest.mark.slow

OPTIONS = Options(clients=20, duration=5.0, warmup=1.0, users=4, progress=2.0)


@dataclass
class Result:
    run: Run
    items: list[dict[str, Any]]  # every memory after the flush
    outbox: dict[str, int]
    log_problems: dict[str, int]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Result:
    with stack(OPTIONS, tmp_path_factory.mktemp("load")) as s:
        run = asyncio.run(drive(s.url, OPTIONS, s.watch))
        flush(s.url)
        return Result(run=run, items=list_memories(s.url), outbox=outbox_state(s.outbox),
                      log_problems=s.log_problems())


def test_every_streamed_request_under_load_ends_with_done_and_the_upstream_reply(
        result: Result) -> None:
    exchanges = result.run.exchanges
    assert [(e.text, e.error) for e in exchanges if e.error is not None] == []
    assert all(e.done and e.acked for e in exchanges)
    # Every client ran, concurrently with the others, and each got its own request id.
    assert {e.client for e in exchanges} == set(range(OPTIONS.clients))
    assert len({e.request_id for e in exchanges}) == len(exchanges)
    assert None not in {e.request_id for e in exchanges}
    assert result.log_problems == {"tracebacks": 0, "errors": 0, "warnings": 0}


def test_write_back_keeps_up_every_exchange_stored_exactly_once_after_flush(result: Result) -> None:
    exchanges = result.run.exchanges
    assert result.outbox == {"pending": 0, "dead": 0}
    assert check_stored(exchanges, result.items) == {
        "expected": len(exchanges), "stored": len(exchanges), "missing": 0, "duplicated": 0,
        "unexpected": 0}
    by_text = {e.text: e for e in exchanges}
    for item in result.items:
        e = by_text[item["text"]]
        assert (item["object"], item["user"], item["type"], item["status"], item["version"]) == (
            "memory", e.user, "raw", "active", 1)
        assert [(s["request_id"], s["session_id"], s["role"]) for s in item["sources"]] == [
            (e.request_id, f"load-{e.client}", "user")]


def test_recall_under_load_injects_only_the_asking_users_memories(result: Result) -> None:
    owner = {item["id"]: item["user"] for item in result.items}
    injected = [e for e in result.run.exchanges if e.memory_ids]
    # Write-back runs while the clients do, so later requests find earlier turns.
    assert injected
    assert [(e.user, i) for e in injected for i in e.memory_ids if owner.get(i) != e.user] == []
    assert max(len(e.memory_ids) for e in injected) <= 8  # memory.top_k


def test_report_line_counts_every_request_and_no_error(result: Result) -> None:
    figures = summarize(result.run, OPTIONS)
    run = result.run
    measured = [e for e in run.exchanges if e.started >= run.warm_end]
    assert (figures["requests_total"], figures["requests"], figures["errors"],
            figures["error_samples"], figures["completed_with_done"]) == (
        len(run.exchanges), len(measured), 0, [], len(run.exchanges))
    assert set(figures) == {
        "bench", "clients", "duration_s", "warmup_s", "users", "write", "upstream_chunks",
        "upstream_chunk_delay_ms", "cpus", "requests_total", "requests", "throughput_rps",
        "ttfb_ms", "latency_ms", "errors", "error_samples", "completed_with_done",
        "with_memories_injected", "rss_mib", "rss_samples_mib", "outbox_pending_samples",
        "proxy_cpu_ms_per_req", "client_cpu_ms_per_req"}
    assert set(figures["rss_mib"]) == {"after_warmup", "end", "growth", "anon_growth",
                                       "file_growth", "max"}
    for key in ("ttfb_ms", "latency_ms"):
        q = figures[key]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"]
    assert figures["ttfb_ms"]["p50"] <= figures["latency_ms"]["p50"]


def test_proxy_memory_stays_bounded_after_warm_up(result: Result) -> None:
    run = result.run
    assert run.after_warmup is not None and run.end is not None
    # Generous on purpose: the store's files grow some 5 KiB per memory written and the
    # allocator has its noise (7 MiB in all measured here for ~400 exchanges); a leak of
    # the request path's buffers at this rate of requests would cost far more.
    assert run.end.rss - run.after_warmup.rss < 64 * 2**20


def test_split_reply_rejoins_exactly() -> None:
    from proxy.testing.load_upstream import split_text

    assert split_text(REPLY, 4) == ["Hello from ", "the ", "fake ", "upstream."]
    assert split_text("one", 4) == ["one"]
    assert "".join(split_text("a b c d e f g", 3)) == "a b c d e f g"


def test_load_upstream_serves_openai_sdk_streams_and_completions() -> None:
    import openai

    from proxy.testing.load_upstream import running

    with running(chunks=3, delay=0.001) as up:
        sdk = openai.OpenAI(base_url=up.url, api_key="unused", max_retries=0)
        chunks = list(sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert (text, chunks[-1].usage is not None, reply.choices[0].message.content) == (
            REPLY, True, REPLY)
        assert Counter(c.choices[0].finish_reason for c in chunks if c.choices)["stop"] == 1
        assert up.requests == 2

