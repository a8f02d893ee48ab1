"""``/v1/responses`` translated to chat: the real openai SDK (sync and async) against the
proxy over the scripted fake upstream, which knows only chat completions here; stored
responses, continuation, tools, streams and their failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.settings import AuthSettings, ResponsesSettings, TenantConfig
from proxy.testing.fake_upstream import FakeUpstream, Reply, Status, Stream, chunk, completion
from proxy.testing.live import Live, serve
from tests.conftest import upstream_settings

KEYS = {"acme": "sk-acme", "globex": "sk-globex"}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Live]:
    settings = upstream_settings(tmp_path, upstream)
    settings.auth = AuthSettings(enabled=True)
    settings.tenants = [TenantConfig(id=t, api_keys=[k]) for t, k in KEYS.items()]
    with serve(create_app(settings)) as server:
        yield server


def client(live: Live, tenant: str = "acme", user: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=KEYS[tenant], max_retries=0,
                         default_headers={"x-memcube-user": user})


def sse_events(live: Live, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream's events as sent (type line and data must agree)."""
    events = []
    with httpx.stream("POST", f"{live.base_url}/responses", json={**body, "stream": True},
                      headers={"authorization": f"Bearer {KEYS['acme']}",
                               "x-memcube-user": "alice"}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


def test_plain_response_has_openai_shape_and_chat_fields(live: Live, upstream: FakeUpstream) -> None:
    r = client(live).responses.create(
        model="up", input="Say hi", instructions="Be brief.", max_output_tokens=50,
        temperature=0.2, top_p=0.9, metadata={"trace": "t1"}, user="bob",
        parallel_tool_calls=False)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Hello from the fake upstream."
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text"
    assert r.usage is not None and r.usage.input_tokens == 5 and r.usage.output_tokens == 7
    assert r.usage.total_tokens == 12
    assert r.instructions == "Be brief." and r.metadata == {"trace": "t1"}
    assert r.max_output_tokens == 50 and r.incomplete_details is None
    sent = upstream.history[-1].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Say hi"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.2, 0.9)
    assert "parallel_tool_calls" not in sent  # chat refuses it without tools
    assert upstream.history[-1].path.endswith("/chat/completions")


def test_output_cut_at_max_output_tokens_is_incomplete(live: Live, upstream: FakeUpstream) -> None:
    cut = completion("Hello fr")
    cut["choices"][0]["finish_reason"] = "length"
    upstream.enqueue(Reply(cut))
    r = client(live).responses.create(model="up", input="Say hi", max_output_tokens=3)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "Hello fr"


def test_input_items_become_chat_messages(live: Live, upstream: FakeUpstream) -> None:
    client(live).responses.create(model="up", input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Look: "},
                     {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"role": "assistant", "content": "A picture."},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ], tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False)
    sent = upstream.history[-1].body
    assert sent["messages"] == [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                "detail": "auto"}}]},
        {"role": "assistant", "content": "A picture.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": WEATHER["parameters"]}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False


def test_text_format_json_schema_is_passed_as_response_format(live: Live,
                                                               upstream: FakeUpstream) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    upstream.enqueue(Reply(completion('{"a": 1}')))
    r = client(live).responses.create(model="up", input="json please", text={
        "format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert json.loads(r.output_text) == {"a": 1}
    assert upstream.history[-1].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert r.text.format.type == "json_schema"


def tool_call_reply(arguments: str = "{\"city\":\"Paris\"}") -> Reply:
    return Reply(completion(content=None, tool_calls=[
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": arguments}}]))


def test_function_tool_round_trip_with_previous_response_id(live: Live,
                                                            upstream: FakeUpstream) -> None:
    c = client(live)
    upstream.enqueue(tool_call_reply())
    first = c.responses.create(model="up", input="Weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id == "call_1" and json.loads(call.arguments) == {"city": "Paris"}
    upstream.enqueue(Reply(completion("It is sunny in Paris.")))
    second = c.responses.create(
        model="up", previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert second.output_text == "It is sunny in Paris."
    assert second.previous_response_id == first.id
    assert upstream.history[-1].body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]


def test_continuation_sends_the_stored_conversation_without_old_instructions(
        live: Live, upstream: FakeUpstream) -> None:
    c = client(live)
    first = c.responses.create(model="up", input="My name is Ada.", instructions="Old rules.")
    c.responses.create(model="up", input="What is my name?", previous_response_id=first.id,
                       instructions="New rules.")
    assert upstream.history[-1].body["messages"] == [
        {"role": "system", "content": "New rules."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello from the fake upstream."},
        {"role": "user", "content": "What is my name?"},
    ]


def test_stored_responses_are_isolated_by_tenant_and_user(live: Live) -> None:
    r = client(live).responses.create(model="up", input="secret")
    assert client(live).responses.retrieve(r.id).id == r.id
    for other in (client(live, "globex"), client(live, "acme", "mallory")):
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError) as exc:
            other.responses.create(model="up", input="more", previous_response_id=r.id)
        assert exc.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(r.id)
    assert client(live).responses.retrieve(r.id).id == r.id  # nothing was deleted


def test_store_false_keeps_nothing(live: Live) -> None:
    r = client(live).responses.create(model="up", input="ephemeral", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client(live).responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client(live).responses.create(model="up", input="more", previous_response_id=r.id)


def test_retrieve_delete_and_input_items(live: Live) -> None:
    c = client(live)
    items = [{"role": "user", "content": f"line {i}"} for i in range(5)]
    r = c.responses.create(model="up", input=items)  # type: ignore[arg-type]
    got = c.responses.retrieve(r.id)
    assert got.output_text == r.output_text and got.created_at == r.created_at
    listed = list(c.responses.input_items.list(r.id, order="asc", limit=2))
    assert [i.content[0].text for i in listed] == [f"line {i}" for i in range(5)]  # type: ignore[union-attr]
    page = c.responses.input_items.list(r.id, limit=2)
    assert [i.content[0].text for i in page.data] == ["line 4", "line 3"]  # type: ignore[union-attr]
    assert page.has_more is True
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(r.id)


EVENT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta",
               "response.output_text.done", "response.content_part.done",
               "response.output_item.done", "response.completed"]


def test_stream_events_come_in_openai_order_and_match_the_stored_response(live: Live) -> None:
    events = sse_events(live, {"model": "up", "input": "Say hi"})
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas == 5
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == EVENT_ORDER
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["total_tokens"] > 0
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello from the fake upstream."
    assert events[kinds.index("response.output_text.done")]["text"] == text
    stored = client(live).responses.retrieve(done["id"])
    assert stored.output_text == text and stored.status == "completed"


def test_sdk_stream_helper_gives_the_final_response(live: Live, upstream: FakeUpstream) -> None:
    with client(live).responses.stream(model="up", input="Say hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from the fake upstream."
    assert upstream.history[-1].body["stream_options"] == {"include_usage": True}


def test_streamed_tool_call_has_argument_events(live: Live, upstream: FakeUpstream) -> None:
    calls = [
        chunk(None) | {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]},
        *[chunk(None) | {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": part}}]}, "finish_reason": None}]}
          for part in ("{\"city\":", "\"Oslo\"}")],
        chunk(None, finish="tool_calls"),
    ]
    upstream.enqueue(Stream(calls))
    events = sse_events(live, {"model": "up", "input": "Weather?", "tools": [WEATHER]})
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    assert events[5]["arguments"] == "{\"city\":\"Oslo\"}" and events[5]["name"] == "get_weather"
    item = events[-1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["call_id"] == "call_9"


def test_stream_failing_midway_ends_with_response_failed(live: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Stream([chunk("Hel")], cut=True))
    events = sse_events(live, {"model": "up", "input": "Say hi"})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["message"]


def test_upstream_error_before_the_stream_is_an_http_error(live: Live,
                                                          upstream: FakeUpstream) -> None:
    upstream.enqueue(Status(503))
    with pytest.raises(openai.APIStatusError) as exc:
        client(live).responses.create(model="up", input="hi", stream=True)
    assert exc.value.status_code == 502


async def test_async_sdk_create_stream_and_retrieve(live: Live) -> None:
    c = openai.AsyncOpenAI(base_url=live.base_url, api_key=KEYS["acme"], max_retries=0)
    r = await c.responses.create(model="up", input="hi")
    assert r.output_text == "Hello from the fake upstream."
    stream = await c.responses.create(model="up", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert (await c.responses.retrieve(r.id)).id == r.id
    await c.close()


def test_retention_expires_stored_responses(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = upstream_settings(tmp_path, upstream)
    settings.responses = ResponsesSettings(retention_days=1e-9)
    with serve(create_app(settings)) as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        r = c.responses.create(model="up", input="hi")
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(r.id)
    settings.responses = ResponsesSettings(retention_days=0)
    with serve(create_app(settings)) as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        r = c.responses.create(model="up", input="hi")
        assert r.output_text
        with pytest.raises(openai.NotFoundError) as exc:
            c.responses.retrieve(r.id)
        assert "retention_days" in exc.value.message


@pytest.mark.parametrize("body, param", [
    ({"model": "up"}, "input"),
    ({"model": "up", "input": 5}, "input"),
    ({"model": "up", "input": [{"role": "wizard", "content": "hi"}]}, "input.[0].role"),
    ({"model": "up", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input.[0].call_id"),
    ({"model": "up", "input": [{"type": "function_call_output", "call_id": "c"}]},
     "input.[0].output"),
    ({"model": "up", "input": [{"type": "banana"}]}, "input.[0]"),
    ({"model": "up", "input": "hi", "tools": [{"type": "web_search"}]}, "tools.[0].type"),
    ({"model": "up", "input": "hi", "tools": [{"type": "function"}]}, "tools.[0].name"),
    ({"model": "up", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "up", "input": "hi", "temperature": 3}, "temperature"),
    ({"model": "up", "input": "hi", "store": "yes"}, "store"),
    ({"model": "up", "input": "hi", "text": {"format": {"type": "json_schema"}}},
     "text.format.schema"),
    ({"model": "up", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "input.[0].content.[0].type"),
    ({"model": "up", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input.[0]"),
    ({"model": "up", "input": "hi", "memory": {"top_k": -1}}, "memory.top_k"),
    ({"model": "up", "input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input"),
])
def test_bad_requests_are_400s_naming_the_field(live: Live, body: dict[str, Any],
                                                 param: str) -> None:
    r = httpx.post(f"{live.base_url}/responses", json=body, timeout=10,
                   headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_model_and_unknown_ids_are_404s(live: Live) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client(live).responses.create(model="nope", input="hi")
    assert exc.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client(live).responses.retrieve("resp_" + "0" * 32)
    r = httpx.get(f"{live.base_url}/responses/{'x' * 500}", timeout=10,
                  headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_id"


def test_responses_need_a_key_like_chat(live: Live) -> None:
    r = httpx.post(f"{live.base_url}/responses", json={"model": "up", "input": "hi"}, timeout=10)
    assert r.status_code == 401
    r = httpx.get(f"{live.base_url}/responses/resp_1", timeout=10)
    assert r.status_code == 401


def test_a_response_that_cannot_be_stored_is_still_answered(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    store = live.context.responses
    assert store is not None

    def full_disk(record: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save", full_disk)
    r = client(live).responses.create(model="up", input="hi")
    assert r.output_text == "Hello from the fake upstream."
    events = sse_events(live, {"model": "up", "input": "hi"})
    assert events[-1]["type"] == "response.completed"
    monkeypatch.undo()
    with pytest.raises(openai.NotFoundError):
        client(live).responses.retrieve(r.id)


def test_a_continuation_may_send_no_new_input(live: Live, upstream: FakeUpstream) -> None:
    first = client(live).responses.create(model="up", input="Tell me a story.")
    client(live).responses.create(model="up", previous_response_id=first.id)
    assert upstream.history[-1].body["messages"] == [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Hello from the fake upstream."}]
