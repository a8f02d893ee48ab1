"""Fine extraction on a shared local model (issue 20): bounded calls, serving first,
a shutdown that does not wait for it, and JSON forced by a grammar.

The local model's generations are watched at the backend's edge to llama-cpp-python
(:class:`Generations`): in the order its worker ran them, whether each was an
extraction (sampled under a grammar) or a chat, and how many pieces it made. Grammar
sampling is native code; the crash path that runs first, in a child, samples under a
grammar too (tests/test_native.py), like every native path these tests take in-process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError

from memory.extract import FineExtractor, decision_format, facts_format, fast
from memory.layer import Exchange, Turn
from memory.models import MemoryItem
from memory.outbox import Outbox
from proxy.app import create_app
from proxy.backends.llamacpp import LlamaCppBackend
from proxy.backends.llamacpp.bridge import Worker
from proxy.backends.llamacpp.grammar import MAX_DEPTH, nesting, response_grammar
from proxy.backends.llamacpp.turns import Turns
from proxy.settings import EmbedderSettings, MemorySettings, ModelConfig, Settings
from proxy.testing.fake_upstream import FakeUpstream, Reply, completion
from proxy.testing.live import Live, serve

USER = {"x-memcube-user": "alice"}
SAID = "My sister Ana lives in Porto and I play the cello every Sunday."


def until(condition: Callable[[], bool], what: str, limit: float = 120) -> None:
    """Wait (not a timed assertion: ``limit`` only ends a test that would hang)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


async def until_async(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.005)


# -- whose turn: serving first, background after ------------------------------------------

def chunks(name: str, order: list[str], hold: threading.Event | None = None
           ) -> Callable[[], Iterator[dict[str, Any]]]:
    """A stand-in for llama-cpp-python's stream: notes when it starts, may wait."""
    def generate() -> Iterator[dict[str, Any]]:
        order.append(name)
        if hold is not None:
            hold.wait(60)
        yield {"choices": [{"text": name, "finish_reason": "stop"}]}
    return generate


async def test_waiting_requests_run_before_queued_background_work() -> None:
    worker = Worker("turns")
    order: list[str] = []
    hold = threading.Event()

    async def run(name: str, background: bool, held: threading.Event | None = None) -> None:
        async for _ in worker.pieces(lambda: None, chunks(name, order, held), background=background):
            pass

    running = asyncio.create_task(run("extraction-0", True, hold))
    await until_async(lambda: order == ["extraction-0"], "the first extraction to start")
    queued = [asyncio.create_task(run(name, name.startswith("extraction")))
              for name in ("extraction-1", "extraction-2", "chat-1", "chat-2")]
    await until_async(lambda: sum(worker.waiting) == 4, "everyone to queue")
    hold.set()
    await asyncio.gather(running, *queued)
    # Each chat waited for the one extraction step in flight, not for those queued.
    assert order == ["extraction-0", "chat-1", "chat-2", "extraction-1", "extraction-2"]
    await worker.idle()
    worker.close()


async def test_a_turn_handed_to_a_cancelled_call_passes_on() -> None:
    turns = Turns()
    await turns.acquire()
    chat = asyncio.create_task(turns.acquire())
    extraction = asyncio.create_task(turns.acquire(background=True))
    await until_async(lambda: turns.waiting == (1, 1), "both to queue")
    turns.release()  # handed to the chat ...
    chat.cancel()  # ... which is cancelled before it runs
    with suppress(asyncio.CancelledError):
        await chat
    await extraction  # the turn went on to the next in line
    assert turns.busy and turns.waiting == (0, 0)
    turns.release()
    assert not turns.busy


async def test_closing_the_worker_stops_a_running_generation() -> None:
    worker = Worker("close")
    produced = threading.Event()

    def endless() -> Iterator[dict[str, Any]]:
        while True:
            produced.set()
            yield {"choices": [{"text": ".", "finish_reason": None}]}
            time.sleep(0.001)

    async def run() -> None:
        async for _ in worker.pieces(lambda: None, endless, background=True):
            pass

    task = asyncio.create_task(run())
    await until_async(produced.is_set, "the generation to start")
    await asyncio.to_thread(worker.close)  # returns only once the thread let go
    assert worker.last_generation is not None and worker.last_generation.cancelled
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


# -- the extractor's calls ----------------------------------------------------------------

def exchange(text: str = SAID, tenant: str = "acme") -> Exchange:
    return Exchange(request_id="r1", tenant=tenant, user="alice", session_id="s1", model="m",
                    messages=[{"role": "user", "content": text}], reply="Nice!", options={},
                    at=1700000000)


async def test_each_call_is_bounded_and_asks_for_its_schema() -> None:
    calls: list[dict[str, Any]] = []
    replies = [{"facts": [{"text": "The user plays the cello", "type": "fact"}]},
               {"event": "UPDATE", "id": "m-1", "text": "The user plays the cello on Sundays"}]

    async def complete(messages: list[dict[str, str]], **options: Any) -> str:
        calls.append(options)
        return json.dumps(replies.pop(0))

    known = MemoryItem(id="m-1", tenant="acme", cube_id="c", user="alice",
                       text="The user plays the cello")

    async def similar(text: str) -> list[MemoryItem]:
        return [known]

    ops = await FineExtractor(complete, max_tokens=99, timeout=30).extract(exchange(), similar)
    assert [(o.kind, o.target, o.extractor) for o in ops] == [("UPDATE", "m-1", "fine")]
    assert [c["max_tokens"] for c in calls] == [99, 99]
    assert [c["tenant"] for c in calls] == ["acme", "acme"]
    assert calls[0]["response_format"] == facts_format(5)
    decision = calls[1]["response_format"]["json_schema"]["schema"]
    assert decision["properties"]["id"]["enum"] == ["m-1", None]  # only ids that exist


async def test_a_reply_cut_short_keeps_the_facts_it_completed_each_once() -> None:
    fact = '{"text": "The user plays the cello", "type": "fact"}'
    cut = '{"facts": [' + ", ".join([fact] * 3) + ', {"text": "The user pl'

    async def complete(messages: list[dict[str, str]], **options: Any) -> str:
        return cut

    async def similar(text: str) -> list[MemoryItem]:
        return []

    ops = await FineExtractor(complete).extract(exchange(), similar)
    assert [(o.kind, o.text, o.extractor) for o in ops] == [
        ("ADD", "The user plays the cello", "fine")]


def test_the_extraction_schemas_make_grammars_the_local_model_takes() -> None:
    for fmt in (facts_format(10), decision_format(["a-1", "b-2"])):
        gbnf = response_grammar({"response_format": fmt})
        assert gbnf is not None and 0 < nesting(gbnf) <= MAX_DEPTH


async def test_a_call_past_its_time_is_cancelled_and_the_turn_stored_raw() -> None:
    cancelled = asyncio.Event()

    async def complete(messages: list[dict[str, str]], **options: Any) -> str:
        try:
            await asyncio.Event().wait()  # a model that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ""

    async def similar(text: str) -> list[MemoryItem]:
        return []

    ex = exchange()
    ops = await FineExtractor(complete, timeout=0.05).extract(ex, similar)
    assert cancelled.is_set()  # the call was stopped, not left running
    assert [(o.kind, o.text, o.extractor) for o in ops] == [
        (o.kind, o.text, "fast") for o in fast(ex)]


def test_extraction_bounds_are_settings() -> None:
    mem = MemorySettings()
    assert (mem.extraction_max_tokens, mem.extraction_timeout) == (256, 60.0)
    for bad in ({"extraction_timeout": 0}, {"extraction_max_tokens": 0}):
        with pytest.raises(ValidationError):
            MemorySettings.model_validate(bad)


def test_upstream_extraction_gets_the_same_fields(tmp_path: Path, upstream: FakeUpstream,
                                                  model_cache: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=upstream.url, max_retries=0)],
        memory=MemorySettings(extraction="fine", extraction_model="up", extraction_max_tokens=77,
                              extraction_timeout=30,
                              embedder=EmbedderSettings(cache_dir=model_cache)))
    facts = {"facts": [{"text": "The user's sister Ana lives in Porto", "type": "fact"}]}
    upstream.enqueue(Reply(completion("Nice!")), Reply(completion(json.dumps(facts))))
    with serve(create_app(settings)) as live:
        openai.OpenAI(base_url=live.base_url, api_key="k", max_retries=0,
                      default_headers=USER).chat.completions.create(
            model="up", messages=[{"role": "user", "content": SAID}])
        assert httpx.post(f"{live.base_url}/memories/flush", timeout=60).status_code == 200
        items = memories(live)
    body = upstream.history[1].body
    assert body["max_tokens"] == 77
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "memory_facts"
    assert [(i["text"], i["extractor"]) for i in items] == [
        ("The user's sister Ana lives in Porto", "fine")]


# -- response_format on the local model ---------------------------------------------------

def local(live: Live) -> LlamaCppBackend:
    backend = live.context.backends["local"]
    assert isinstance(backend, LlamaCppBackend)
    return backend


def chat(live: Live, **body: Any) -> httpx.Response:
    return httpx.post(f"{live.base_url}/chat/completions", timeout=120, json={
        "model": "local", "messages": [{"role": "user", "content": "Name three colours."}],
        **body})


@pytest.mark.parametrize(("fmt", "param"), [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_object", "schema": {"$ref": "https://example.com/s.json"}},
     "response_format.schema"),
])
def test_a_response_format_the_local_model_cannot_follow_is_400(
        local_server: Live, fmt: object, param: str) -> None:
    r = chat(local_server, response_format=fmt)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_schema_that_would_crash_llama_cpp_is_400_and_the_server_lives(
        local_server: Live) -> None:
    # The converter nests a string of maxLength n n deep; llama.cpp's recursive parser
    # overflowed its stack (SIGSEGV) at 20,000.
    deep = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 20000}}}}}
    r = chat(local_server, response_format=deep)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert chat(local_server, max_tokens=1).status_code == 200


def test_an_infinite_logit_bias_is_400(local_server: Live) -> None:
    # 1e309 parses as infinity; under a grammar it aborted llama.cpp.
    raw = (b'{"model": "local", "messages": [{"role": "user", "content": "Hi"}], '
           b'"response_format": {"type": "json_object"}, "logit_bias": {"90": -1e309}}')
    r = httpx.post(f"{local_server.base_url}/chat/completions", content=raw, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


COLOURS = {"type": "object", "required": ["colours"], "additionalProperties": False,
           "properties": {"colours": {"type": "array", "items": {"type": "string"},
                                      "maxItems": 3}}}


def test_json_object_and_json_schema_give_json_stream_or_not(local_server: Live) -> None:
    sdk = openai.OpenAI(base_url=local_server.base_url, api_key="k", max_retries=0)
    messages: Any = [{"role": "user", "content": "Name three colours."}]
    plain = sdk.chat.completions.create(model="local", messages=messages, max_tokens=64,
                                        temperature=0).choices[0].message.content or ""
    with pytest.raises(ValueError):
        json.loads(plain)  # left to itself, the small model answers in prose
    obj = sdk.chat.completions.create(model="local", messages=messages, max_tokens=128,
                                      temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "colours", "schema": COLOURS}}
    whole = sdk.chat.completions.create(model="local", messages=messages, max_tokens=128,
                                        temperature=0, response_format=fmt)
    data = json.loads(whole.choices[0].message.content or "")
    assert list(data) == ["colours"] and len(data["colours"]) <= 3
    assert all(isinstance(c, str) for c in data["colours"])
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model="local", messages=messages, max_tokens=128, temperature=0, response_format=fmt,
        stream=True) if c.choices)
    assert streamed == whole.choices[0].message.content


# -- fine extraction with the embedded model ----------------------------------------------

class Generations:
    """The local model's generations, in the order its worker ran them: ("extraction"
    or "chat", max_tokens, pieces made). ``endless``: extractions are swapped for a
    generation that does not end before its max_tokens, as the unbounded calls of the
    issue ran for minutes."""

    def __init__(self, backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch, *,
                 endless: bool = False) -> None:
        self.runs: list[list[Any]] = []
        self.endless_tokens = 1500
        original = backend._completion
        banned = {t: -100.0 for t in backend.end_token_ids()}

        def completion(tokens: list[int], kwargs: dict[str, Any]) -> Iterator[Any]:
            kind = "extraction" if kwargs.get("grammar") is not None else "chat"
            run = [kind, kwargs["max_tokens"], 0]
            self.runs.append(run)
            if endless and kind == "extraction":
                kwargs = {**kwargs, "grammar": None, "logit_bias": banned,
                          "max_tokens": self.endless_tokens}
            for out in original(tokens, kwargs):
                run[2] += 1
                yield out

        monkeypatch.setattr(backend, "_completion", completion)

    @property
    def kinds(self) -> list[str]:
        return [r[0] for r in self.runs]


def fine_settings(data_dir: Path, model_cache: Path, **memory: Any) -> Settings:
    return Settings(data_dir=data_dir,
                    models=[ModelConfig(name="local", backend="llamacpp", n_ctx=2048)],
                    memory=MemorySettings(extraction="fine", extraction_model="local",
                                          embedder=EmbedderSettings(cache_dir=model_cache),
                                          **memory))


def memories(live: Live) -> list[dict[str, Any]]:
    r = httpx.get(f"{live.base_url}/memories", params={"user": "alice"}, timeout=60)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def tell(live: Live, text: str = SAID) -> str:
    """Say something to remember, through the chat API; the request's id."""
    raw = openai.OpenAI(base_url=live.base_url, api_key="k", max_retries=0,
                        default_headers=USER).chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0)
    return raw.headers["x-memcube-request-id"]


def flush(live: Live) -> None:
    assert httpx.post(f"{live.base_url}/memories/flush", timeout=300).status_code == 200


def test_the_embedded_model_extracts_facts_within_the_token_bound(
        tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(create_app(fine_settings(tmp_path / "data", model_cache))) as live:
        seen = Generations(local(live), monkeypatch)
        tell(live)
        flush(live)
        items = memories(live)
    # A stream's pieces: one per token, and a last one with the finish reason.
    extractions = [r for r in seen.runs if r[0] == "extraction"]
    assert extractions and all(r[1] == 256 and r[2] <= 256 + 1 for r in extractions), seen.runs
    assert items and {i["extractor"] for i in items} == {"fine"}, items  # no raw fallback


def test_a_chat_goes_before_extraction_queued_on_the_same_model(
        tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(create_app(fine_settings(tmp_path / "data", model_cache))) as live:
        backend = local(live)
        seen = Generations(backend, monkeypatch)
        held, release = threading.Event(), threading.Event()

        def hold(llm: Any) -> None:  # a generation that runs until released
            held.set()
            release.wait(120)

        holding = asyncio.run_coroutine_threadsafe(backend.run_cleared(hold), live.loop)
        until(held.is_set, "the model to be held")
        service = live.context.memory_service()
        turn = Turn(request_id="said-1", tenant="default", user="alice", session_id=None,
                    model="local")
        live.call(service.remember(turn, [{"role": "user", "content": SAID}], "Nice!"))
        until(lambda: sum(backend.waiting) == 1, "the extraction to queue")
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(chat, live, max_tokens=8, temperature=0)
            until(lambda: sum(backend.waiting) == 2, "the chat to queue")
            release.set()
            assert asked.result().status_code == 200
        holding.result(60)
        flush(live)
    # Queued after the extraction, the chat ran first; the extraction ran after it.
    assert seen.kinds[:2] == ["chat", "extraction"], seen.runs


def test_an_extraction_past_its_time_stops_generating_and_the_turn_is_stored_raw(
        tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = fine_settings(tmp_path / "data", model_cache, extraction_timeout=2)
    with serve(create_app(settings)) as live:
        backend = local(live)
        seen = Generations(backend, monkeypatch, endless=True)
        tell(live)
        flush(live)
        items = memories(live)
        live.call(backend.idle())
        stats = backend.last_generation
    assert seen.kinds == ["chat", "extraction"]
    assert stats is not None and stats.cancelled and stats.pieces < seen.endless_tokens
    assert [(i["text"], i["extractor"]) for i in items] == [(SAID, "fast")]


def test_shutdown_stops_extraction_and_the_exchange_is_written_back_after_restart(
        tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = fine_settings(tmp_path / "data", model_cache, extraction_timeout=3600,
                             extraction_max_tokens=96)
    with serve(create_app(settings)) as live:
        backend = local(live)
        seen = Generations(backend, monkeypatch, endless=True)
        said = tell(live)
        until(lambda: "extraction" in seen.kinds and seen.runs[-1][2] > 0,
              "the extraction to generate")
        service = live.context.memory_service()
    # serve() waits 30 s at most for the app to stop; the endless extraction alone
    # would take minutes. The app stopped: write-back and the model are closed.
    assert not service.worker.running and not backend.ready
    stats = backend.last_generation
    assert stats is not None and stats.cancelled and stats.pieces < seen.endless_tokens
    outbox = Outbox(settings.data_dir / "outbox.sqlite3")
    try:
        assert outbox.pending_count() == 1  # still there, for the next start
    finally:
        outbox.close()
    with serve(create_app(settings)) as live:
        flush(live)
        items = memories(live)
        assert live.context.memory_service().outbox.pending_count() == 0
    assert items and all(i["sources"][0]["request_id"] == said for i in items)
    assert {i["extractor"] for i in items} == {"fine"}, items
