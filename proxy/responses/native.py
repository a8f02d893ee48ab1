"""``responses: native`` models: ``POST /v1/responses`` relayed to the upstream's own
Responses API, with memory.

The request runs through the same pipeline as every other (recall, the tenant's
adapter, write-back, headers, a client leaving), through a :class:`NativeBackend`
that turns the pipeline's chat-shaped call back into the client's Responses body: the
memories recall injected go first in ``instructions``, nothing else changes. The
upstream's reply and its stream events are relayed as they came; only the text is
read, for write-back, and the finished response, to store.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from proxy.backends.base import ChatBackend, Completion, RequestContext, StreamEvent
from proxy.errors import ProxyError
from proxy.responses import translate as t
from proxy.responses.stream import Finish, frame


class NativeBackend(ChatBackend):
    """One request's view of an upstream that serves ``/responses`` itself."""

    def __init__(self, upstream: ChatBackend, body: dict[str, Any],
                 messages: list[dict[str, Any]]) -> None:
        self.upstream = upstream
        self.body = body
        #: The messages recall read: whatever else it sends on, it injected.
        self.messages = messages
        self.cancel_on_disconnect = upstream.cancel_on_disconnect

    def payload(self, chat: dict[str, Any]) -> dict[str, Any]:
        own = {id(m) for m in self.messages}
        injected = [str(m.get("content") or "") for m in chat.get("messages", [])
                    if id(m) not in own]
        payload = {k: v for k, v in self.body.items() if k != "memory"}
        if injected:
            payload["instructions"] = "\n\n".join(
                [*injected, *([self.body["instructions"]] if self.body.get("instructions") else [])])
        return payload

    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        return await self.upstream.native_responses(self.payload(body), ctx)

    def stream(self, body: dict[str, Any],
               ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        raise NotImplementedError("a native stream is relayed in groups (stream_events)")

    def stream_events(self, body: dict[str, Any], ctx: RequestContext | None = None
                      ) -> AsyncGenerator[list[StreamEvent], None]:
        return self.upstream.native_responses_stream(self.payload(body), ctx)


class NativeCodec:
    """Relays the upstream's reply and events; reads the text and the final response."""

    def __init__(self, finish: Finish) -> None:
        self.finish = finish
        self.final: dict[str, Any] | None = None
        self.seq = 0

    def reply_text(self, completion: Completion) -> str:
        return t.reply_text(completion.data.get("output") or [])

    async def render(self, completion: Completion) -> bytes:
        await self.finish(completion.data)
        return completion.raw if completion.raw is not None else json.dumps(completion.data).encode()

    def encode(self, group: list[StreamEvent], text: list[str]) -> bytes:
        out = []
        for event in group:
            data = event.data
            kind = data.get("type")
            if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
                text.append(data["delta"])
            elif kind in ("response.completed", "response.incomplete") and isinstance(
                    data.get("response"), dict):
                self.final = data["response"]
            if isinstance(data.get("sequence_number"), int):
                self.seq = data["sequence_number"] + 1
            out.append(event.raw if event.raw is not None else frame(data))
        return b"".join(out)

    def error(self, exc: ProxyError) -> bytes:
        body = exc.body()["error"]
        return frame({"type": "error", "code": body.get("code") or body.get("type"),
                      "message": body.get("message"), "param": body.get("param"),
                      "sequence_number": self.seq})

    async def end(self, reply: str | None) -> bytes:
        if reply is not None and self.final is not None:
            await self.finish(self.final)
        return b""

