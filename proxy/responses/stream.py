"""Chat completion chunks as the Responses API's typed stream events.

One :class:`ResponsesCodec` serves one request: it numbers the events, opens an output
item when its first chunk arrives (a message, or a function call per tool call) and
closes them in order at the end, then sends ``response.completed`` (or
``response.incomplete`` when cut at ``max_output_tokens``). A failure mid-stream is a
``response.failed`` event carrying the error: the stream ends, it is never just cut.
Each event is an SSE frame ``event: <type>`` / ``data: <json>``, as OpenAI sends them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.backends.base import Completion, StreamEvent, completion_text
from proxy.errors import ProxyError
from proxy.responses import translate as t
from proxy.responses.protocol import ResponsesRequest

#: Called with the finished response object before its last event goes out (it is
#: stored then, so a client may continue from it as soon as it has read it).
Finish = Callable[[dict[str, Any]], Awaitable[None]]


def frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


@dataclass(slots=True)
class _Call:
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str = ""


class ResponsesCodec:
    """The Responses API's encoding of one request, non-stream and stream."""

    def __init__(self, req: ResponsesRequest, response_id: str, finish: Finish) -> None:
        self.req = req
        self.id = response_id
        self.created = time.time()
        self.finish = finish
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []
        self.text_index: int | None = None  # output index of the open message
        self.text: list[str] = []
        self.calls: dict[int, _Call] = {}
        self.open_calls: list[_Call] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    # -- non-stream ------------------------------------------------------------------------

    def reply_text(self, completion: Completion) -> str:
        return completion_text(completion.data)

    async def render(self, completion: Completion) -> bytes:
        output, finish = t.output_items(completion.data)
        response = t.response_object(self.req, self.id, self.created, status="completed",
                                     output=output, finish=finish,
                                     chat_usage=completion.data.get("usage"))
        await self.finish(response)
        return json.dumps(response, ensure_ascii=False).encode()

    # -- stream ----------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return frame({"type": kind, "sequence_number": self.seq - 1, **fields})

    def _snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return t.response_object(self.req, self.id, self.created, status=status,
                                 output=self.output, finish=self.finish_reason,
                                 chat_usage=self.usage, **extra)

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        snapshot = self._snapshot("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def encode(self, group: list[StreamEvent], text: list[str]) -> bytes:
        out = self._start()
        for event in group:
            chunk = event.data
            if isinstance(chunk.get("usage"), dict):
                self.usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if not choices or not isinstance(choices[0], dict):
                continue
            choice = choices[0]
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                out += self._text_delta(content)
                text.append(content)
            for call in delta.get("tool_calls") or []:
                out += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return b"".join(out)

    def _text_delta(self, content: str) -> list[bytes]:
        out = []
        if self.text_index is None:
            self.text_index = len(self.output)
            item = t.message_item(t.new_id("msg"), "", status="in_progress")
            item["content"] = []
            self.output.append(item)
            out.append(self._event("response.output_item.added", output_index=self.text_index,
                                   item=item))
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=self.text_index, content_index=0,
                                   part=t.output_text("")))
        self.text.append(content)
        out.append(self._event("response.output_text.delta", item_id=self._text_item()["id"],
                               output_index=self.text_index, content_index=0, delta=content,
                               logprobs=[]))
        return out

    def _text_item(self) -> dict[str, Any]:
        assert self.text_index is not None
        return self.output[self.text_index]

    def _call_delta(self, call: dict[str, Any]) -> list[bytes]:
        out = []
        index = call.get("index", 0)
        fn = call.get("function") or {}
        known = self.calls.get(index)
        if known is None:
            out += self._close_text()
            known = _Call(t.new_id("fc"), len(self.output), call.get("id") or t.new_id("call"),
                          fn.get("name") or "")
            self.calls[index] = known
            self.open_calls.append(known)
            item = t.function_call_item(known.item_id, known.call_id, known.name, "",
                                        status="in_progress")
            self.output.append(item)
            out.append(self._event("response.output_item.added", output_index=known.output_index,
                                   item=item))
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            known.arguments += arguments
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=known.item_id, output_index=known.output_index,
                                   delta=arguments))
        return out

    def _close_text(self) -> list[bytes]:
        if self.text_index is None:
            return []
        index, self.text_index = self.text_index, None
        text = "".join(self.text)
        item = t.message_item(self.output[index]["id"], text)
        self.output[index] = item
        part = item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                            content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _close_calls(self) -> list[bytes]:
        out = []
        for call in self.open_calls:
            item = t.function_call_item(call.item_id, call.call_id, call.name, call.arguments)
            self.output[call.output_index] = item
            out.append(self._event("response.function_call_arguments.done", item_id=call.item_id,
                                   output_index=call.output_index, name=call.name,
                                   arguments=call.arguments))
            out.append(self._event("response.output_item.done", output_index=call.output_index,
                                   item=item))
        self.open_calls.clear()
        return out

    def error(self, exc: ProxyError) -> bytes:
        out = self._start()
        body = exc.body()["error"]
        failed = self._snapshot("failed", error={"code": body.get("code") or body.get("type"),
                                                 "message": body.get("message")})
        out.append(self._event("response.failed", response=failed))
        return b"".join(out)

    async def end(self, reply: str | None) -> bytes:
        if reply is None:
            return b""  # the failure's own event ended the stream
        out = self._start() + self._close_text() + self._close_calls()
        response = self._snapshot("completed")
        await self.finish(response)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=response))
        return b"".join(out)
