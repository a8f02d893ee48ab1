"""Backend selection and the direct relay's edge cases, with httpx's MockTransport."""

from __future__ import annotations

import json

import httpx
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

BODY = {"model": "alias", "messages": [{"role": "user", "content": "x"}]}


def relay(handler: httpx.MockTransport, retries: int = 0) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(upstream_model="real", api_base="http://up/v1", api_key="k",
                             timeout=5, connect_timeout=1, max_retries=retries,
                             transport=handler)


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


async def test_relay_rewrites_model_only_and_sends_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [], "id": "x"})

    backend = relay(httpx.MockTransport(handler))
    reply = await backend.complete({**BODY, "custom": 1})
    assert reply.data == {"choices": [], "id": "x"}
    assert json.loads(reply.raw or b"") == reply.data
    sent = json.loads(seen[0].content)
    assert sent == {"model": "real", "messages": BODY["messages"], "custom": 1}
    assert seen[0].headers["authorization"] == "Bearer k"
    assert str(seen[0].url) == "http://up/v1/chat/completions"
    await backend.close()


async def test_relay_retries_connect_errors_then_succeeds() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"choices": []})

    assert (await relay(httpx.MockTransport(handler), retries=2).complete(BODY)).data == \
        {"choices": []}
    assert calls == 3


async def test_relay_gives_up_after_retries() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(UpstreamUnavailableError):
        await relay(httpx.MockTransport(handler), retries=1).complete(BODY)


async def test_relay_does_not_retry_4xx() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json={"error": {"message": "bad", "param": "messages"}})

    with pytest.raises(UpstreamStatusError) as info:
        await relay(httpx.MockTransport(handler), retries=3).complete(BODY)
    assert calls == 1
    assert (info.value.status, info.value.param) == (400, "messages")


async def test_relay_read_timeout_is_504() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(UpstreamTimeoutError):
        await relay(httpx.MockTransport(handler)).complete(BODY)


@pytest.mark.parametrize("payload", [b"[]", b'{"no": "choices"}', b"\xff\xfe"])
async def test_relay_malformed_reply_is_502(payload: bytes) -> None:
    backend = relay(httpx.MockTransport(lambda r: httpx.Response(200, content=payload)))
    with pytest.raises(UpstreamError) as info:
        await backend.complete(BODY)
    assert info.value.status == 502


async def _collect(backend: OpenAIHTTPBackend) -> list[dict[str, object]]:
    return [c async for c in backend.stream({**BODY, "stream": True})]


async def test_relay_stream_without_done_is_an_error() -> None:
    sse = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    backend = relay(httpx.MockTransport(lambda r: httpx.Response(200, content=sse)))
    got: list[dict[str, object]] = []
    with pytest.raises(UpstreamError, match=r"before \[DONE\]"):
        async for c in backend.stream({**BODY, "stream": True}):
            got.append(c)
    assert got == [{"choices": [{"delta": {"content": "a"}}]}]


async def test_relay_stream_error_event_is_an_error() -> None:
    sse = b'data: {"error": {"message": "overloaded"}}\n\ndata: [DONE]\n\n'
    backend = relay(httpx.MockTransport(lambda r: httpx.Response(200, content=sse)))
    with pytest.raises(UpstreamError, match="overloaded"):
        await _collect(backend)


async def test_relay_stream_ignores_comments_and_blank_lines() -> None:
    sse = b': keep-alive\n\ndata: {"choices": []}\n\nevent: x\ndata: [DONE]\n\n'
    backend = relay(httpx.MockTransport(lambda r: httpx.Response(200, content=sse)))
    assert await _collect(backend) == [{"choices": []}]


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
