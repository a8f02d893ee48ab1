"""Backend selection, and the direct relay's edge cases against the scripted upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from proxy.backends import build_backend, uses_direct_transport
from proxy.backends.litellm_backend import LiteLLMBackend
from proxy.backends.openai_http import OpenAIHTTPBackend
from proxy.errors import (
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    upstream_error_from_status,
)
from proxy.settings import ModelConfig, UpstreamSettings
from proxy.testing.fake_upstream import Delay, FakeUpstream, Raw, Reply, Status, Stream, chunk
from proxy.testing.live import refused_port

BODY = {"model": "alias", "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture
async def relay(upstream: FakeUpstream) -> AsyncIterator[OpenAIHTTPBackend]:
    backend = make_relay(upstream.url)
    await backend.start()
    yield backend
    await backend.close()


def make_relay(api_base: str, retries: int = 0, timeout: float = 5) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(upstream_model="real", api_base=api_base, api_key="k",
                             timeout=timeout, connect_timeout=1, max_retries=retries)


@pytest.mark.parametrize(
    ("model", "extra", "direct"),
    [("openai/gpt-4o-mini", {}, True),
     ("gpt-4o-mini", {}, True),
     ("hosted_vllm/qwen", {"api_base": "http://v/v1"}, True),
     ("hosted_vllm/qwen", {}, False),
     ("anthropic/claude", {}, False),
     ("ollama_chat/llama3", {"api_base": "http://o"}, False),
     ("openai/gpt-4o-mini", {"transport": "litellm"}, False),
     ("groq/llama", {"transport": "direct", "api_base": "http://g/v1"}, True)],
)
def test_transport_choice(model: str, extra: dict[str, str], direct: bool) -> None:
    cfg = ModelConfig.model_validate({"name": "m", "backend": "litellm", "model": model, **extra})
    assert uses_direct_transport(cfg) is direct
    backend = build_backend(cfg, UpstreamSettings())
    assert isinstance(backend, OpenAIHTTPBackend if direct else LiteLLMBackend)


def test_forced_direct_without_base_is_refused() -> None:
    cfg = ModelConfig(name="m", backend="litellm", model="groq/x", transport="direct")
    with pytest.raises(ValueError, match="api_base"):
        build_backend(cfg, UpstreamSettings())


async def test_relay_rewrites_model_only_and_sends_key(relay: OpenAIHTTPBackend,
                                                       upstream: FakeUpstream) -> None:
    upstream.enqueue(Reply({"choices": [], "id": "x"}))
    reply = await relay.complete({**BODY, "custom": 1})
    assert reply.data == {"choices": [], "id": "x"}
    assert json.loads(reply.raw or b"") == reply.data
    sent = upstream.history[0]
    assert sent.body == {"model": "real", "messages": BODY["messages"], "custom": 1}
    assert sent.headers["authorization"] == "Bearer k"
    assert sent.path == "/v1/chat/completions"


async def test_relay_gives_up_after_retries_on_refused_connections() -> None:
    backend = make_relay(f"http://127.0.0.1:{refused_port()}/v1", retries=1)
    with pytest.raises(UpstreamUnavailableError):
        await backend.complete(BODY)
    await backend.close()


async def test_relay_retries_5xx_but_not_4xx(upstream: FakeUpstream) -> None:
    backend = make_relay(upstream.url, retries=3)
    upstream.enqueue(Status(502), Status(503), Reply({"choices": []}))
    assert (await backend.complete(BODY)).data == {"choices": []}
    assert len(upstream.history) == 3
    upstream.enqueue(Status(400, "bad", code="c"), Reply({"choices": []}))
    with pytest.raises(UpstreamStatusError) as info:
        await backend.complete(BODY)
    assert len(upstream.history) == 4
    assert (info.value.status, info.value.code) == (400, "c")
    await backend.close()


async def test_relay_slow_reply_is_504(upstream: FakeUpstream) -> None:
    backend = make_relay(upstream.url, timeout=0.3)
    upstream.enqueue(Delay(1.0))
    with pytest.raises(UpstreamTimeoutError):
        await backend.complete(BODY)
    await backend.close()


async def test_relay_slow_stream_chunk_is_a_timeout(upstream: FakeUpstream) -> None:
    backend = make_relay(upstream.url, timeout=0.3)
    upstream.enqueue(Delay(1.0, Stream([chunk("late")])))
    with pytest.raises(UpstreamTimeoutError):
        await collect(backend)
    await backend.close()


@pytest.mark.parametrize("payload", [b"[]", b'{"no": "choices"}', b"\xff\xfe"])
async def test_relay_malformed_reply_is_502(relay: OpenAIHTTPBackend, upstream: FakeUpstream,
                                            payload: bytes) -> None:
    upstream.enqueue(Raw(payload, content_type="application/json"))
    with pytest.raises(UpstreamError) as info:
        await relay.complete(BODY)
    assert info.value.status == 502


async def collect(backend: OpenAIHTTPBackend) -> list[dict[str, object]]:
    return [c async for c in backend.stream({**BODY, "stream": True})]


async def test_relay_stream_without_done_is_an_error(relay: OpenAIHTTPBackend,
                                                     upstream: FakeUpstream) -> None:
    upstream.enqueue(Raw(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'))
    got: list[dict[str, object]] = []
    with pytest.raises(UpstreamError, match=r"before \[DONE\]"):
        async for c in relay.stream({**BODY, "stream": True}):
            got.append(c)
    assert got == [{"choices": [{"delta": {"content": "a"}}]}]


async def test_relay_stream_error_event_is_an_error(relay: OpenAIHTTPBackend,
                                                    upstream: FakeUpstream) -> None:
    upstream.enqueue(Raw(b'data: {"error": {"message": "overloaded"}}\n\ndata: [DONE]\n\n'))
    with pytest.raises(UpstreamError, match="overloaded"):
        await collect(relay)


async def test_relay_stream_malformed_chunk_is_an_error(relay: OpenAIHTTPBackend,
                                                        upstream: FakeUpstream) -> None:
    upstream.enqueue(Raw(b"data: {not json\n\ndata: [DONE]\n\n"))
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(relay)


async def test_relay_stream_ignores_comments_and_other_fields(relay: OpenAIHTTPBackend,
                                                              upstream: FakeUpstream) -> None:
    upstream.enqueue(Raw(b': keep-alive\n\ndata: {"choices": []}\n\nevent: x\ndata: [DONE]\n\n'))
    assert await collect(relay) == [{"choices": []}]


async def test_relay_stream_4xx_before_first_chunk(relay: OpenAIHTTPBackend,
                                                   upstream: FakeUpstream) -> None:
    upstream.enqueue(Status(429, "slow down"))
    with pytest.raises(UpstreamStatusError) as info:
        await collect(relay)
    assert info.value.status == 429
    assert info.value.type == "rate_limit_error"


@pytest.mark.parametrize(
    ("status", "status_out", "type_"),
    [(400, 400, "invalid_request_error"), (401, 401, "authentication_error"),
     (403, 403, "permission_error"), (429, 429, "rate_limit_error"),
     (500, 502, "api_error"), (503, 502, "api_error")],
)
def test_upstream_status_mapping(status: int, status_out: int, type_: str) -> None:
    err = upstream_error_from_status(status, b'{"error": {"message": "m"}}')
    assert (err.status, err.type) == (status_out, type_)
    assert err.body()["error"]["message"] == "upstream: m"


def test_upstream_status_with_unparseable_body() -> None:
    err = upstream_error_from_status(418, b"teapot")
    assert err.status == 418
    assert "418" in err.message


def test_litellm_reports_an_upstream_4xx_even_after_retried_connection_errors() -> None:
    import litellm

    backend = LiteLLMBackend(upstream_model="openai/m", api_base="http://u/v1", api_key="k",
                             timeout=5, max_retries=2)
    try:
        raise ConnectionError("first attempt refused")
    except ConnectionError as first:
        limited = litellm.RateLimitError('{"error": {"message": "slow down"}}',
                                         llm_provider="openai", model="m")
        limited.__context__ = first
    mapped = backend.map_error(limited)
    assert isinstance(mapped, UpstreamStatusError) and mapped.status == 429
    # A 500 that hides a refused connection is still reported as unreachable.
    hidden = litellm.InternalServerError("Connection error.", llm_provider="openai", model="m")
    hidden.__cause__ = ConnectionError("refused")
    assert isinstance(backend.map_error(hidden), UpstreamUnavailableError)
