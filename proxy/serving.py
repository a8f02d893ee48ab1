"""Chat completions: the request pipeline.

parse -> resolve model and user -> memory.recall (inject) -> backend -> response
-> memory.remember (before the response ends). Errors before the first byte are
HTTP errors; errors after it become one error frame followed by ``[DONE]``.

Memory never fails a request: what it could not do is named in ``X-Memcube-Degraded``
(see :mod:`memory.layer`). A non-stream response knows whether its exchange was
recorded; a stream's headers leave before that, so they carry the outbox's state as
the stream began, and a stream whose exchange was refused says so at its end in an
SSE comment (``: x-memcube-degraded write-back``), which OpenAI clients skip.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from memory.layer import WRITE_BACK, MemoryLayer, Turn
from proxy.adapters import AdapterRegistry
from proxy.backends.base import (
    ChatBackend,
    RequestContext,
    StreamEvent,
    chunk_text,
    completion_text,
)
from proxy.errors import ModelNotFoundError, ProxyError, error_body
from proxy.protocol import parse_chat_request
from proxy.sse import EventStreamResponse

log = logging.getLogger(__name__)

USER_HEADER = "x-memcube-user"
SESSION_HEADER = "x-memcube-session"
DONE_FRAME = b"data: [DONE]\n\n"
DEGRADED_HEADER = "x-memcube-degraded"
WRITE_BACK_REFUSED_FRAME = b": x-memcube-degraded write-back\n\n"
# nginx-style "client closed request": logged and counted, never seen by the client.
CLIENT_CLOSED = 499


def sse_frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ChatService:
    def __init__(self, backends: dict[str, ChatBackend], memory: MemoryLayer,
                 adapters: AdapterRegistry | None = None) -> None:
        self.backends = backends
        self.memory = memory
        self.adapters = adapters

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        body, req = parse_chat_request(raw)
        backend = self.backends.get(req.model)
        if backend is None:
            raise ModelNotFoundError(req.model)
        state = request.scope["state"]
        state["model"] = req.model
        body.pop("memory", None)
        turn = Turn(
            request_id=state["request_id"],
            tenant=state["principal"].tenant,
            user=request.headers.get(USER_HEADER) or req.user or "default",
            session_id=request.headers.get(SESSION_HEADER),
            model=req.model,
            options=req.memory.model_dump(exclude_none=True) if req.memory else {},
        )
        messages = body["messages"]
        recall = await self.memory.recall(turn, messages)
        body["messages"] = recall.messages
        ctx = RequestContext(tenant=turn.tenant, prefix=recall.prefix)
        headers = {"x-memcube-memories": ",".join(recall.memory_ids)}
        state["degraded"] = list(recall.degraded)  # for logs and metrics
        applied = self.adapters.apply(ctx, backend) if self.adapters is not None else None
        if applied:
            headers["x-memcube-adapter"] = applied
        if req.stream:
            return await self._stream(request, backend, body, turn, messages, headers, ctx)
        return await self._complete(request, backend, body, turn, messages, headers, ctx)

    async def _complete(self, request: Request, backend: ChatBackend, body: dict[str, Any],
                        turn: Turn, messages: list[dict[str, Any]],
                        headers: dict[str, str], ctx: RequestContext) -> Response:
        if backend.cancel_on_disconnect:
            work = asyncio.ensure_future(backend.complete(body, ctx))
            gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                log.info("client disconnected; generation stopped")
                await self._remember(turn, messages, None)
                return Response(status_code=CLIENT_CLOSED)
            completion = work.result()
        else:
            completion = await backend.complete(body, ctx)
        recorded = await self._remember(turn, messages, completion_text(completion.data))
        state = request.scope["state"]
        # The outbox's answer replaces what recall foresaw of it.
        degraded = [d for d in state["degraded"] if d != WRITE_BACK]
        if not recorded:
            degraded.append(WRITE_BACK)
        state["degraded"] = degraded
        if degraded:
            headers[DEGRADED_HEADER] = ",".join(degraded)
        content = completion.raw if completion.raw is not None else json.dumps(completion.data)
        headers["x-memcube-activation"] = ctx.activation
        return Response(content=content, media_type="application/json", headers=headers)

    async def _stream(self, request: Request, backend: ChatBackend, body: dict[str, Any],
                      turn: Turn, messages: list[dict[str, Any]],
                      headers: dict[str, str], ctx: RequestContext) -> EventStreamResponse:
        groups = backend.stream_events(body, ctx)
        try:
            # Pull the first chunks now so that a failure to start is a proper HTTP error.
            first: list[StreamEvent] = await groups.__anext__()
        except StopAsyncIteration:
            first = []
        except BaseException:
            await groups.aclose()
            raise
        state = request.scope["state"]
        headers["x-memcube-activation"] = ctx.activation  # known once the stream started
        if state["degraded"]:
            headers[DEGRADED_HEADER] = ",".join(state["degraded"])
        frames = self._frames(groups, first, state, turn, messages)
        return EventStreamResponse(frames, headers)

    async def _frames(self, groups: AsyncGenerator[list[StreamEvent], None],
                      first: list[StreamEvent], state: dict[str, Any], turn: Turn,
                      messages: list[dict[str, Any]]) -> AsyncGenerator[bytes, None]:
        text: list[str] = []
        finished = False
        try:
            try:
                if first:
                    yield self._encode(first, text)
                async for group in groups:
                    yield self._encode(group, text)
                reply: str | None = "".join(text)
            except ProxyError as exc:
                log.warning("stream failed: %s", exc.message)
                state["error_type"] = exc.type
                yield sse_frame(exc.body())
                reply = None
            except Exception:
                log.exception("stream failed")
                state["error_type"] = "api_error"
                yield sse_frame(error_body("internal error while streaming", "api_error"))
                reply = None
            if not await self._remember(turn, messages, reply):
                if WRITE_BACK not in state["degraded"]:
                    state["degraded"].append(WRITE_BACK)
                yield WRITE_BACK_REFUSED_FRAME
            finished = True
            yield DONE_FRAME
        finally:
            await groups.aclose()
            if not finished:
                # The client left mid-stream: keep what it said, not the half reply.
                await self._remember(turn, messages, None)

    async def _remember(self, turn: Turn, messages: list[dict[str, Any]],
                        reply: str | None) -> bool:
        """Whether the exchange was durably recorded. Never raises: the reply exists by
        now, and a failure here is reported as degraded, not as a failed request."""
        try:
            # Only an explicit False is a refusal: a layer that returns nothing kept it.
            return await self.memory.remember(turn, messages, reply) is not False
        except Exception:
            log.exception("write-back failed after the reply")
            return False

    @staticmethod
    def _encode(group: list[StreamEvent], text: list[str]) -> bytes:
        """One write for a group of chunks; relayed JSON is not encoded again."""
        out = []
        for event in group:
            text.append(chunk_text(event.data))
            raw = event.raw if event.raw is not None else json.dumps(
                event.data, separators=(",", ":")).encode()
            out.append(b"data: " + raw + b"\n\n")
        return b"".join(out)
