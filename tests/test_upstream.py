"""Upstream models through real HTTP against the scripted fake upstream.

Every behaviour is pinned for both transports: the direct relay (the fast path for
OpenAI-compatible upstreams) and litellm (for providers that need translation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.testing.fake_upstream import (
    Delay,
    FakeUpstream,
    Malformed,
    Reply,
    Status,
    Stream,
    chunk,
    completion,
)
from proxy.testing.live import Live, refused_port, serve
from tests.conftest import upstream_settings

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["direct", "litellm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream, transport: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-upstream-secret")
    with serve(create_app(upstream_settings(tmp_path, upstream, transport, timeout=2.0))) as live:
        yield live


def sdk(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="client-key", max_retries=0)


def post(live: Live, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{live.base_url}/chat/completions", json=body, timeout=30)


def test_non_stream_reply_reaches_client(proxy: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Reply(completion("the answer")))
    reply = sdk(proxy).chat.completions.create(model="up", messages=MESSAGES)
    assert reply.choices[0].message.content == "the answer"
    assert reply.usage is not None and reply.usage.total_tokens == 12
    sent = upstream.history[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "fake-model"
    assert sent.body["messages"] == MESSAGES
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"


def test_stream_reply_reaches_client(proxy: Live, upstream: FakeUpstream) -> None:
    chunks = list(sdk(proxy).chat.completions.create(
        model="up", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake upstream."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert upstream.history[-1].body["stream_options"] == {"include_usage": True}


def test_tool_calls_pass_through_both_ways(proxy: Live, upstream: FakeUpstream) -> None:
    tool_call = {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    upstream.enqueue(Reply(completion(None, tool_calls=[tool_call])))  # type: ignore[arg-type]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    reply = sdk(proxy).chat.completions.create(model="up", messages=MESSAGES, tools=tools,
                                               tool_choice="auto")
    call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"
    sent = upstream.history[-1].body
    assert sent["tools"] == tools
    assert sent["tool_choice"] == "auto"


def test_streamed_tool_call_deltas_pass_through(proxy: Live, upstream: FakeUpstream) -> None:
    delta = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": "{}"}}
    upstream.enqueue(Stream([chunk(role="assistant", tool_calls=[delta]),
                             chunk(finish="tool_calls")]))
    chunks = list(sdk(proxy).chat.completions.create(model="up", messages=MESSAGES, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and
             c.choices[0].delta.tool_calls]
    assert calls[0][0].function.name == "lookup"  # type: ignore[index,union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_unknown_and_openai_fields_reach_upstream(proxy: Live, upstream: FakeUpstream) -> None:
    body = {"model": "up", "messages": MESSAGES, "seed": 7, "stop": ["\n"], "n": 1,
            "logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_object"},
            "my_vendor_flag": {"nested": [1, 2]}, "memory": {"enabled": False}}
    assert post(proxy, body).status_code == 200
    sent = upstream.history[-1].body
    for key in ("seed", "stop", "n", "logprobs", "top_logprobs", "response_format",
                "my_vendor_flag"):
        assert sent[key] == body[key], key
    assert "memory" not in sent  # the proxy's own extension stays in the proxy


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429])
def test_upstream_4xx_keeps_status(proxy: Live, upstream: FakeUpstream, status: int) -> None:
    upstream.enqueue(Status(status, "upstream says no", code="bad_thing"))
    r = post(proxy, {"model": "up", "messages": MESSAGES})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "upstream says no" in err["message"]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_is_502(proxy: Live, upstream: FakeUpstream, status: int) -> None:
    upstream.enqueue(Status(status))
    r = post(proxy, {"model": "up", "messages": MESSAGES})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "api_error"


def test_malformed_upstream_reply_is_502(proxy: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Malformed())
    r = post(proxy, {"model": "up", "messages": MESSAGES})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "api_error"


def test_upstream_timeout_is_504(proxy: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Delay(3.0))  # the model's timeout is 2 s
    r = post(proxy, {"model": "up", "messages": MESSAGES})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"


def test_stream_cut_midway_ends_with_error_frame_then_done(proxy: Live,
                                                           upstream: FakeUpstream) -> None:
    upstream.enqueue(Stream([chunk("", role="assistant"), chunk("partial")], cut=True))
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions",
                      json={"model": "up", "messages": MESSAGES, "stream": True}) as r:
        assert r.status_code == 200
        frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert any("partial" in f for f in frames[:-2])


def stream_frames(live: Live) -> list[str]:
    """A stream request's data frames, after checking it started as a 200 stream."""
    with httpx.stream("POST", f"{live.base_url}/chat/completions", timeout=30,
                      json={"model": "up", "messages": MESSAGES, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def assert_error_then_done(frames: list[str], code: str) -> None:
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert (error["error"]["type"], error["error"]["code"]) == ("api_error", code)
    assert sum(1 for f in frames if f.startswith('{"error"')) == 1


def test_stream_stalled_midway_ends_with_timeout_frame_then_done(proxy: Live,
                                                                  upstream: FakeUpstream) -> None:
    # The model's timeout (2 s) bounds the wait between two reads, not the whole stream.
    upstream.enqueue(Stream([chunk("", role="assistant"), chunk("partial"), Delay(3.0)]))
    frames = stream_frames(proxy)
    assert any("partial" in f for f in frames[:-2])
    assert_error_then_done(frames, "upstream_timeout")


def test_malformed_chunk_midway_ends_with_error_frame_then_done(proxy: Live,
                                                                upstream: FakeUpstream) -> None:
    # The pause makes the good chunk its own read, so the stream has started.
    upstream.enqueue(Stream([chunk("", role="assistant"), chunk("partial"), Delay(0.3),
                             b"data: {this is not json\n\n"]))
    frames = stream_frames(proxy)
    assert any("partial" in f for f in frames[:-2])
    assert_error_then_done(frames, "upstream_error")


def test_stream_cut_before_first_chunk_is_a_502(proxy: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Stream([], cut=True))
    r = post(proxy, {"model": "up", "messages": MESSAGES, "stream": True})
    assert r.status_code == 502
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"]) == ("api_error", None)
    # The relay sees a stream that ended early; litellm, a connection that broke.
    assert err["code"] in ("upstream_error", "upstream_unavailable")


def test_stream_that_fails_before_first_chunk_is_an_http_error(proxy: Live,
                                                               upstream: FakeUpstream) -> None:
    upstream.enqueue(Status(503))
    r = post(proxy, {"model": "up", "messages": MESSAGES, "stream": True})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "api_error"


def test_metrics_count_upstream_errors(proxy: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Status(503))
    post(proxy, {"model": "up", "messages": MESSAGES})
    post(proxy, {"model": "up", "messages": MESSAGES})
    text = httpx.get(f"{proxy.url}/metrics").text
    assert ('memcube_requests_total{model="up",route="/v1/chat/completions",status="502"} 1.0'
            in text)
    assert ('memcube_requests_total{model="up",route="/v1/chat/completions",status="200"} 1.0'
            in text)
    assert 'memcube_request_errors_total{model="up",route="/v1/chat/completions",' in text


def test_connection_refused_is_502(tmp_path: Path, upstream: FakeUpstream,
                                   transport: str) -> None:
    settings = upstream_settings(tmp_path, upstream, transport,
                                 api_base=f"http://127.0.0.1:{refused_port()}/v1")
    with serve(create_app(settings)) as live:
        r = post(live, {"model": "up", "messages": MESSAGES})
        rs = post(live, {"model": "up", "messages": MESSAGES, "stream": True})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "api_error"
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert rs.status_code == 502
    assert rs.json()["error"]["code"] == "upstream_unavailable"


def test_retries_recover_from_a_transient_503(tmp_path: Path, upstream: FakeUpstream,
                                              transport: str) -> None:
    settings = upstream_settings(tmp_path, upstream, transport, max_retries=2)
    upstream.enqueue(Status(503), Reply(completion("second time lucky")))
    with serve(create_app(settings)) as live:
        reply = sdk(live).chat.completions.create(model="up", messages=MESSAGES)
    assert reply.choices[0].message.content == "second time lucky"
    assert len(upstream.history) == 2
