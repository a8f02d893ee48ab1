"""The embedded llama.cpp model through real HTTP, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from proxy.backends.llamacpp import LlamaCppBackend
from proxy.testing.live import Live

PROMPT = [{"role": "user", "content": "Name three colours."}]


def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def backend(live: Live) -> LlamaCppBackend:
    b = live.context.backends["local"]
    assert isinstance(b, LlamaCppBackend)
    return b


def endless(b: LlamaCppBackend) -> dict[str, float]:
    """A logit_bias that bans every way the model can end its turn."""
    return {str(t): -100.0 for t in b.end_token_ids()}


def test_non_stream_returns_openai_completion(local_server: Live) -> None:
    raw = client(local_server).with_raw_response.chat.completions.create(
        model="local", messages=PROMPT, max_tokens=16, temperature=0
    )
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.model == "local"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert len(raw.headers["x-memcube-request-id"]) == 32
    assert raw.headers["x-memcube-activation"] == "none"
    assert raw.headers["x-memcube-memories"] == ""


def test_temperature_zero_is_deterministic_and_stream_matches(local_server: Live) -> None:
    c = client(local_server)
    texts = [
        c.chat.completions.create(model="local", messages=PROMPT, max_tokens=24, temperature=0)
        .choices[0].message.content
        for _ in range(2)
    ]
    chunks = list(c.chat.completions.create(model="local", messages=PROMPT, max_tokens=24,
                                            temperature=0, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert texts[0] == texts[1] == streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Tokens arrive as they are made: many content chunks, not one.
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 5


def test_stream_include_usage_sends_usage_chunk_last(local_server: Live) -> None:
    chunks = list(client(local_server).chat.completions.create(
        model="local", messages=PROMPT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_ends_with_done_on_the_wire(local_server: Live) -> None:
    body = {"model": "local", "messages": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{local_server.base_url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames)
    json.loads(frames[-2][6:])


async def test_async_client_stream_and_non_stream(local_server: Live) -> None:
    c = openai.AsyncOpenAI(base_url=local_server.base_url, api_key="unused", max_retries=0)
    reply = await c.chat.completions.create(model="local", messages=PROMPT, max_tokens=12,
                                            temperature=0)
    stream = await c.chat.completions.create(model="local", messages=PROMPT, max_tokens=12,
                                             temperature=0, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == reply.choices[0].message.content
    await c.close()


def test_concurrent_requests_queue_and_each_gets_its_own_answer(local_server: Live) -> None:
    prompts = [[{"role": "user", "content": f"Count to {n}."}] for n in (3, 5, 7, 9)]
    c = client(local_server)

    def ask(messages: list[dict[str, str]]) -> str:
        r = c.chat.completions.create(model="local", messages=messages, max_tokens=16,
                                      temperature=0)
        return r.choices[0].message.content or ""

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_stream_client_disconnect_stops_generation(local_server: Live) -> None:
    b = backend(local_server)
    body = {"model": "local", "messages": PROMPT, "max_tokens": 1500, "stream": True,
            "logit_bias": endless(b)}
    with httpx.stream("POST", f"{local_server.base_url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    local_server.call(b.idle())
    stats = b.last_generation
    assert stats is not None and stats.cancelled
    assert stats.pieces < 1500


def test_non_stream_client_disconnect_stops_generation(local_server: Live) -> None:
    b = backend(local_server)
    body = {"model": "local", "messages": PROMPT, "max_tokens": 1500,
            "logit_bias": endless(b)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{local_server.base_url}/chat/completions", json=body, timeout=0.5)
    local_server.call(b.idle())
    stats = b.last_generation
    assert stats is not None and stats.cancelled
    assert stats.pieces < 1500


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
     ({"response_format": {"type": "xml"}}, "response_format.type")],
)
def test_unsupported_local_features_are_400(local_server: Live, extra: dict[str, object],
                                            param: str) -> None:
    r = httpx.post(f"{local_server.base_url}/chat/completions",
                   json={"model": "local", "messages": PROMPT, **extra})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_context_overflow_is_400_context_length_exceeded(local_server: Live) -> None:
    long = "word " * 5000
    r = httpx.post(f"{local_server.base_url}/chat/completions",
                   json={"model": "local", "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "messages"


def test_text_content_parts_are_accepted(local_server: Live) -> None:
    parts = [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]
    a = client(local_server).chat.completions.create(
        model="local", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0)
    b = client(local_server).chat.completions.create(
        model="local", messages=PROMPT, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_generation_does_not_block_the_event_loop(local_server: Live) -> None:
    b = backend(local_server)
    body = {"model": "local", "messages": PROMPT, "max_tokens": 300, "stream": True,
            "logit_bias": endless(b)}
    with httpx.stream("POST", f"{local_server.base_url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        # While tokens are being made, the server still answers other endpoints.
        assert httpx.get(f"{local_server.url}/healthz").status_code == 200
        assert httpx.get(f"{local_server.base_url}/models").status_code == 200
    local_server.call(b.idle())


def test_seeded_sampling_repeats(local_server: Live) -> None:
    c = client(local_server)
    a, b2 = (c.chat.completions.create(model="local", messages=PROMPT, max_tokens=16,
                                       temperature=0.9, seed=42).choices[0].message.content
             for _ in range(2))
    assert a == b2


def test_backend_interface_in_one_loop(local_server: Live) -> None:
    # FIFO: requests queued in order are served in order.
    b = backend(local_server)

    async def run() -> list[str]:
        order: list[str] = []

        async def one(tag: str) -> None:
            await b.complete({"messages": PROMPT, "max_tokens": 2, "temperature": 0})
            order.append(tag)

        await asyncio.gather(*(one(t) for t in "abcd"))
        return order

    assert local_server.call(run()) == ["a", "b", "c", "d"]
