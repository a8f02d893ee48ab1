"""Chat messages are checked as OpenAI checks them: each rule broken is a 400 naming the
field, before any backend is called; valid conversations (tool round trips included)
still reach the upstream unchanged. Real HTTP, the openai SDK, the scripted fake
upstream on both transports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.testing.fake_upstream import FakeUpstream, Reply, completion
from proxy.testing.live import Live, serve
from tests.conftest import upstream_settings

USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
ASSISTANT = {"role": "assistant", "content": None, "tool_calls": [CALL]}
TOOL = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(params=["direct", "litellm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream, transport: str) -> Iterator[Live]:
    with serve(create_app(upstream_settings(tmp_path, upstream, transport))) as live:
        yield live


def call_with(**fields: Any) -> dict[str, Any]:
    return {**CALL, **fields}


def fn_with(**fields: Any) -> dict[str, Any]:
    return call_with(function={**CALL["function"], **fields})  # type: ignore[dict-item]


def without(message: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != key}


# (id, messages, param, what the message says)
BROKEN: list[tuple[str, list[dict[str, Any]], str, str]] = [
    ("user-without-content", [{"role": "user"}], "messages.[0].content",
     "Missing required parameter: 'messages.[0].content'"),
    ("user-content-null", [{"role": "user", "content": None}], "messages.[0].content",
     "a user message needs content"),
    ("system-without-content", [{"role": "system"}, USER], "messages.[0].content",
     "Missing required parameter"),
    ("developer-without-content", [USER, {"role": "developer", "name": "x"}],
     "messages.[1].content", "Missing required parameter"),
    ("later-user-without-content", [USER, {"role": "assistant", "content": "ok"},
                                    {"role": "user"}], "messages.[2].content",
     "Missing required parameter"),
    ("role-unknown", [{"role": "wizard", "content": "hi"}], "messages.[0].role",
     "'system', 'developer', 'user', 'assistant', 'tool' or 'function'"),
    ("role-missing", [USER, {"content": "hi"}], "messages.[1].role",
     "Missing required parameter"),
    ("tool-without-tool-call-id", [USER, ASSISTANT, without(TOOL, "tool_call_id")],
     "messages.[2].tool_call_id", "Missing required parameter"),
    ("tool-call-id-null", [USER, ASSISTANT, {**TOOL, "tool_call_id": None}],
     "messages.[2].tool_call_id", "not null"),
    ("tool-call-id-int", [USER, ASSISTANT, {**TOOL, "tool_call_id": 1}],
     "messages.[2].tool_call_id", "valid string"),
    ("tool-without-content", [USER, ASSISTANT, without(TOOL, "content")],
     "messages.[2].content", "Missing required parameter"),
    ("assistant-empty", [USER, {"role": "assistant"}], "messages.[1].content",
     "needs 'content' or 'tool_calls'"),
    ("assistant-null-and-no-calls", [USER, {"role": "assistant", "content": None,
                                            "tool_calls": []}],
     "messages.[1].content", "needs 'content' or 'tool_calls'"),
    ("tool-calls-object", [USER, {**ASSISTANT, "tool_calls": CALL}],
     "messages.[1].tool_calls", "valid list"),
    ("tool-call-without-id", [USER, {**ASSISTANT, "tool_calls": [without(CALL, "id")]}],
     "messages.[1].tool_calls.[0].id", "Missing required parameter"),
    ("tool-call-without-type", [USER, {**ASSISTANT, "tool_calls": [without(CALL, "type")]}],
     "messages.[1].tool_calls.[0].type", "Missing required parameter"),
    ("tool-call-type-unknown", [USER, {**ASSISTANT, "tool_calls": [call_with(type="magic")]}],
     "messages.[1].tool_calls.[0].type", "'function' or 'custom'"),
    ("tool-call-without-function", [USER, {**ASSISTANT,
                                           "tool_calls": [without(CALL, "function")]}],
     "messages.[1].tool_calls.[0].function", "Missing required parameter"),
    ("function-without-name", [USER, {**ASSISTANT, "tool_calls": [
        call_with(function={"arguments": "{}"})]}],
     "messages.[1].tool_calls.[0].function.name", "Missing required parameter"),
    ("arguments-not-a-string", [USER, {**ASSISTANT, "tool_calls": [
        fn_with(arguments={"city": "Paris"})]}],
     "messages.[1].tool_calls.[0].function.arguments", "valid string"),
    ("second-call-broken", [USER, {**ASSISTANT, "tool_calls": [CALL, call_with(id=None)]}],
     "messages.[1].tool_calls.[1].id", "valid string"),
    ("part-without-type", [{"role": "user", "content": [{"text": "hi"}]}],
     "messages.[0].content.[0].type", "Missing required parameter"),
    ("part-type-int", [{"role": "user", "content": [{"type": 1, "text": "hi"}]}],
     "messages.[0].content.[0].type", "valid string"),
    ("function-message-without-name", [USER, {"role": "function", "content": "x"}],
     "messages.[1].name", "Missing required parameter"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("messages", "param", "says"), [c[1:] for c in BROKEN],
                         ids=[c[0] for c in BROKEN])
def test_each_rule_is_a_400_naming_the_field(proxy: Live, upstream: FakeUpstream,
                                             messages: list[dict[str, Any]], param: str,
                                             says: str, stream: bool) -> None:
    r = httpx.post(f"{proxy.base_url}/chat/completions", timeout=30,
                   json={"model": "up", "messages": messages, "stream": stream})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"  # a stream never started
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert says in err["message"], err
    assert upstream.history == []  # refused before any backend was called


def test_the_sdk_raises_bad_request_with_the_param(proxy: Live, upstream: FakeUpstream) -> None:
    c = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    contentless: Any = [{"role": "user"}]
    with pytest.raises(openai.BadRequestError) as refused:
        c.chat.completions.create(model="up", messages=contentless)
    body: Any = refused.value.body
    assert body["param"] == "messages.[0].content"
    assert upstream.history == []


def test_tool_round_trip_passes_unchanged(proxy: Live, upstream: FakeUpstream) -> None:
    c = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    upstream.enqueue(Reply(completion(None, tool_calls=[CALL])))  # type: ignore[arg-type]
    first = c.chat.completions.create(model="up", messages=[USER], tools=TOOLS)  # type: ignore[list-item,arg-type]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    messages = [USER, assistant, {"role": "tool", "tool_call_id": call.id,
                                  "content": "sunny, 21 C"}]
    upstream.enqueue(Reply(completion("It is sunny in Paris.")))
    second = c.chat.completions.create(model="up", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "It is sunny in Paris."
    sent = upstream.history[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["function"] == CALL["function"]
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}


async def test_async_round_trip_and_lenient_forms(proxy: Live, upstream: FakeUpstream,
                                                  transport: str) -> None:
    """What OpenAI accepts is accepted: null content beside tool calls, empty content,
    a function message with null content, content parts with unknown fields."""
    c = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    messages: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?",
                                      "cache_control": {"type": "ephemeral"}}]},
        ASSISTANT, TOOL,
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thanks"},
    ]
    reply = await c.chat.completions.create(model="up", messages=messages)
    assert reply.choices[0].message.content == "Hello from the fake upstream."
    if transport == "direct":  # the relay forwards the messages exactly
        assert upstream.history[-1].body["messages"] == messages
    stream = await c.chat.completions.create(model="up", messages=messages, stream=True)
    assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    await c.close()


def test_custom_tool_calls_and_legacy_function_messages_pass(proxy: Live,
                                                             upstream: FakeUpstream) -> None:
    custom = {"id": "call_2", "type": "custom", "custom": {"name": "grep", "input": "cats"}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [custom]},
                {"role": "tool", "tool_call_id": "call_2", "content": "3 cats"},
                {"role": "assistant", "content": None,
                 "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "function", "name": "f", "content": None}]
    r = httpx.post(f"{proxy.base_url}/chat/completions", timeout=30,
                   json={"model": "up", "messages": messages})
    assert r.status_code == 200, r.text
    bad = [*messages[:1], {"role": "assistant", "tool_calls": [without(custom, "custom")]}]
    r = httpx.post(f"{proxy.base_url}/chat/completions", timeout=30,
                   json={"model": "up", "messages": bad})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.[1].tool_calls.[0].custom"
