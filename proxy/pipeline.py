"""The memory pipeline every generating endpoint runs:
recall -> inject -> backend -> response -> write-back (before the response ends).

An endpoint parses its body into a :class:`Call` (who asks, the messages memory reads
and writes back, the body for the backend) and hands it to :meth:`Pipeline.complete`
or :meth:`Pipeline.stream`. The pipeline injects memories, picks the tenant's adapter,
calls the backend, records the exchange, and says what memory did in the response
headers. What differs per endpoint, how a reply reads and how a stream is encoded,
comes in as a :class:`Codec`.

Memory never fails a request: what it could not do is named in ``X-Memcube-Degraded``
(see :mod:`memory.layer`). A non-stream response knows whether its exchange was
recorded; a stream's headers leave before that, so they carry the outbox's state as
the stream began, and a stream whose exchange was refused says so at its end in an
SSE comment (``: x-memcube-degraded write-back``), which OpenAI clients skip.
Errors before the first byte are HTTP errors; errors after it become one error frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from memory.layer import WRITE_BACK, Recall, Turn
from proxy import headers as h
from proxy import traces
from proxy.backends.base import ChatBackend, Completion, RequestContext, StreamEvent
from proxy.errors import ProxyError
from proxy.naming import rename
from proxy.sse import EventStreamResponse
from proxy.state import RequestState, request_state

if TYPE_CHECKING:
    from proxy.context import AppContext
    from proxy.settings import MemorySettings

log = logging.getLogger(__name__)

WRITE_BACK_REFUSED_FRAME = b": x-memcube-degraded write-back\n\n"
# nginx-style "client closed request": logged and counted, never seen by the client.
CLIENT_CLOSED = 499


class Codec(Protocol):
    """How an endpoint reads its replies and writes its stream."""

    def reply_text(self, completion: Completion) -> str:
        """A non-stream reply's text, to write back."""
        ...

    async def render(self, completion: Completion) -> bytes:
        """A non-stream reply's body, once its exchange is recorded."""
        ...

    def encode(self, group: list[StreamEvent], text: list[str]) -> bytes:
        """One write for a group of stream events; appends their text to ``text``."""
        ...

    def error(self, exc: ProxyError) -> bytes:
        """The frame of an error after the stream started."""
        ...

    async def end(self, reply: str | None) -> bytes:
        """The stream's last frames, once its exchange is recorded (``reply``: None when
        the stream failed)."""
        ...


@dataclass(slots=True)
class Call:
    """One request through the pipeline."""

    turn: Turn
    #: The client's messages: what recall reads and write-back records.
    messages: list[dict[str, Any]]
    #: What the backend gets; its ``messages`` are replaced by the recalled ones.
    body: dict[str, Any]
    backend: ChatBackend
    state: RequestState
    ctx: RequestContext = field(default_factory=RequestContext)
    headers: dict[str, str] = field(default_factory=dict)


#: The user of requests that name none, when ``memory.anonymous`` is ``shared``.
ANONYMOUS_USER = "default"


def begin(request: Request, model: str, user: str | None,
          options: dict[str, Any]) -> tuple[Turn, RequestState]:
    """Who an authenticated request is for: its :class:`Turn` (the user from
    ``X-Memcube-User``, else the body's ``user``) and its state.

    ``options``: the request's ``memory`` object. ``write`` defaults to ``enabled``, so
    memory turned off writes nothing unless asked to. A request that names no user has
    no memory of its own unless ``memory.anonymous`` is ``shared`` (:attr:`Turn.personal`)."""
    state = request_state(request)
    state.model = model
    state.debug = traces.wanted(request)
    principal = state.principal
    assert principal is not None, "the route authenticates first"
    named = request.headers.get(h.USER) or user
    options = dict(options)
    options.setdefault("write", options.get("enabled", True))
    personal = bool(named) or request.app.state.context.settings.memory.anonymous == "shared"
    turn = Turn(request_id=state.request_id, tenant=principal.tenant,
                user=named or ANONYMOUS_USER, session_id=request.headers.get(h.SESSION),
                model=model, options=options, personal=personal)
    return turn, state


def memory_mode(turn: Turn, settings: MemorySettings) -> str:
    """The ``X-Memcube-Memory`` value: what memory was asked to do for ``turn``."""
    if not settings.enabled:
        return "off"
    if not turn.personal:
        return "anonymous"
    recall, write = turn.options.get("enabled", True), turn.options.get("write", True)
    return {(True, True): "on", (True, False): "recall-only",
            (False, True): "write-only"}.get((bool(recall), bool(write)), "off")


def trace(call: Call, recall: Recall) -> dict[str, Any]:
    """The record ``GET /v1/requests/{id}`` returns: what memory did for ``call``."""
    turn, prefix = call.turn, recall.prefix
    return {"id": turn.request_id, "object": "memcube.request", "created": int(time.time()),
            "model": turn.model, "user": turn.user if turn.personal else None,
            "session_id": turn.session_id, "memory": call.headers[h.MEMORY],
            "memories": recall.memory_ids, "block": recall.block,
            "block_memories": [i for i in recall.memory_ids
                               if prefix is None or i not in prefix.memory_ids],
            "prefix": prefix.content if prefix is not None else None,
            "prefix_memories": sorted(prefix.memory_ids) if prefix is not None else [],
            "adapter": call.headers.get(h.ADAPTER), "degraded": list(recall.degraded)}


class Pipeline:
    def __init__(self, context: AppContext) -> None:
        self.context = context

    async def prepare(self, call: Call) -> None:
        """Recall and inject memories, and pick the tenant's adapter."""
        recall = await self.context.layer.recall(call.turn, call.messages)
        call.body["messages"] = recall.messages
        call.ctx = RequestContext(tenant=call.turn.tenant, prefix=recall.prefix)
        call.headers[h.MEMORIES] = ",".join(recall.memory_ids)
        call.headers[h.MEMORY] = memory_mode(call.turn, self.context.settings.memory)
        call.state.degraded = list(recall.degraded)
        applied = self.context.adapters.apply(call.ctx, call.backend)
        if applied:
            call.headers[h.ADAPTER] = applied
        if call.state.debug:
            self.context.traces.keep(call.turn.tenant, trace(call, recall))

    async def complete(self, call: Call, codec: Codec, receive: Receive) -> Response:
        await self.prepare(call)
        backend, ctx = call.backend, call.ctx
        if backend.cancel_on_disconnect:
            work = asyncio.ensure_future(backend.complete(call.body, ctx))
            gone = asyncio.ensure_future(_wait_for_disconnect(receive))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                log.info("client disconnected; generation stopped")
                await self._remember(call, None)
                return Response(status_code=CLIENT_CLOSED)
            completion = work.result()
        else:
            completion = await backend.complete(call.body, ctx)
        completion.raw, upstream = rename(completion.data, completion.raw, call.turn.model)
        if upstream is not None:
            call.headers[h.UPSTREAM_MODEL] = upstream
        recorded = await self._remember(call, codec.reply_text(completion))
        # The outbox's answer replaces what recall foresaw of it.
        degraded = [d for d in call.state.degraded if d != WRITE_BACK]
        if not recorded:
            degraded.append(WRITE_BACK)
        call.state.degraded = degraded
        if degraded:
            call.headers[h.DEGRADED] = ",".join(degraded)
        content = await codec.render(completion)
        call.headers[h.ACTIVATION] = ctx.activation
        return Response(content=content, media_type="application/json", headers=call.headers)

    async def stream(self, call: Call, codec: Codec) -> EventStreamResponse:
        await self.prepare(call)
        groups = call.backend.stream_events(call.body, call.ctx)
        try:
            # Pull the first chunks now so that a failure to start is a proper HTTP error.
            first: list[StreamEvent] = await groups.__anext__()
        except StopAsyncIteration:
            first = []
        except BaseException:
            await groups.aclose()
            raise
        call.headers[h.ACTIVATION] = call.ctx.activation  # known once the stream started
        for event in first:
            event.raw, upstream = rename(event.data, event.raw, call.turn.model)
            if upstream is not None:
                call.headers[h.UPSTREAM_MODEL] = upstream
        if call.state.degraded:
            call.headers[h.DEGRADED] = ",".join(call.state.degraded)
        return EventStreamResponse(self._frames(call, codec, groups, first), call.headers)

    async def _frames(self, call: Call, codec: Codec,
                      groups: AsyncGenerator[list[StreamEvent], None],
                      first: list[StreamEvent]) -> AsyncGenerator[bytes, None]:
        text: list[str] = []
        finished = False
        try:
            try:
                if first:
                    yield codec.encode(first, text)
                async for group in groups:
                    for event in group:
                        event.raw = rename(event.data, event.raw, call.turn.model)[0]
                    yield codec.encode(group, text)
                reply: str | None = "".join(text)
            except ProxyError as exc:
                log.warning("stream failed: %s", exc.message)
                call.state.error_type = exc.type
                yield codec.error(exc)
                reply = None
            except Exception:
                log.exception("stream failed")
                call.state.error_type = "api_error"
                yield codec.error(ProxyError("internal error while streaming"))
                reply = None
            if not await self._remember(call, reply):
                if WRITE_BACK not in call.state.degraded:
                    call.state.degraded.append(WRITE_BACK)
                yield WRITE_BACK_REFUSED_FRAME
            finished = True
            yield await codec.end(reply)
        finally:
            await groups.aclose()
            if not finished:
                # The client left mid-stream: keep what it said, not the half reply.
                await self._remember(call, None)

    async def _remember(self, call: Call, reply: str | None) -> bool:
        """Whether the exchange was durably recorded. Never raises: the reply exists by
        now, and a failure here is reported as degraded, not as a failed request."""
        try:
            # Only an explicit False is a refusal: a layer that returns nothing kept it.
            return await self.context.layer.remember(call.turn, call.messages, reply) is not False
        except Exception:
            log.exception("write-back failed after the reply")
            return False


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
