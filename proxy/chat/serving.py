"""Chat completions through the memory pipeline: the request's turn, and the chat
encoding of replies and streams (``data: <chunk>`` frames, an error frame, ``[DONE]``)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from proxy.backends.base import Completion, StreamEvent, chunk_text, completion_text
from proxy.chat.protocol import parse_chat_request
from proxy.context import AppContext
from proxy.errors import ProxyError
from proxy.pipeline import Call, Pipeline, begin

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ChatCodec:
    """OpenAI's chat encoding; relayed JSON is not encoded again."""

    def reply_text(self, completion: Completion) -> str:
        return completion_text(completion.data)

    def encode(self, group: list[StreamEvent], text: list[str]) -> bytes:
        out = []
        for event in group:
            text.append(chunk_text(event.data))
            raw = event.raw if event.raw is not None else json.dumps(
                event.data, separators=(",", ":")).encode()
            out.append(b"data: " + raw + b"\n\n")
        return b"".join(out)

    def error(self, exc: ProxyError) -> bytes:
        return sse_frame(exc.body())

    async def render(self, completion: Completion) -> bytes:
        if completion.raw is not None:
            return completion.raw
        return json.dumps(completion.data).encode()

    async def end(self, reply: str | None) -> bytes:
        return DONE_FRAME


CHAT = ChatCodec()


class ChatServing:
    def __init__(self, context: AppContext) -> None:
        self.context = context
        self.pipeline = Pipeline(context)

    async def handle(self, request: Request) -> Response:
        body, req = parse_chat_request(await request.body())
        backend = self.context.backend(req.model)
        body.pop("memory", None)
        turn, state = begin(request, req.model, req.user,
                            req.memory.model_dump(exclude_none=True) if req.memory else {})
        call = Call(turn=turn, messages=body["messages"], body=body, backend=backend, state=state)
        if req.stream:
            return await self.pipeline.stream(call, CHAT)
        return await self.pipeline.complete(call, CHAT, request.receive)
