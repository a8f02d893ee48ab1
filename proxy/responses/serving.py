"""``POST /v1/responses`` through the memory pipeline.

The request is translated to chat (:mod:`proxy.responses.translate`), so recall and
injection, the activation prefix, the tenant's adapter, write-back and the
``X-Memcube-*`` headers work exactly as on chat, and a fact told here is recalled
there. ``previous_response_id`` prepends the stored conversation (the client sends
only what is new); with ``store`` the finished response is kept before its last event
goes out. Models set to ``responses: native`` are relayed to the upstream's own
Responses API instead (:mod:`proxy.responses.native`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from memory.layer import Turn
from proxy.context import AppContext
from proxy.errors import InvalidRequestError, NotFoundError
from proxy.pipeline import Call, Codec, Pipeline, begin
from proxy.responses import translate as t
from proxy.responses.native import NativeBackend, NativeCodec
from proxy.responses.protocol import ResponsesRequest, parse_responses_request
from proxy.responses.store import ResponseStore, StoredResponse
from proxy.responses.stream import ResponsesCodec

log = logging.getLogger(__name__)


class ResponsesServing:
    def __init__(self, context: AppContext) -> None:
        self.context = context
        self.pipeline = Pipeline(context)

    @property
    def store(self) -> ResponseStore | None:
        return self.context.responses

    async def handle(self, request: Request) -> Response:
        body, req = parse_responses_request(await request.body())
        backend = self.context.backend(req.model)
        turn, state = begin(request, req.model, req.user,
                            req.memory.model_dump(exclude_none=True) if req.memory else {})
        previous = await self._previous(turn, req)
        history = previous.conversation if previous is not None else []
        new = t.chat_messages(req)
        if not history and not new and not req.instructions:
            raise InvalidRequestError("The input holds nothing a model can read (only "
                                      "reasoning items).", param="input", code="invalid_value")
        if self._native(req.model):
            # The upstream keeps the conversation of previous_response_id itself.
            native = NativeBackend(backend, body, new)
            codec: Codec = NativeCodec(self._keeper(turn, req, [*history, *new]))
            call = Call(turn=turn, messages=new, body={"messages": new}, backend=native,
                        state=state)
            if req.stream:
                return await self.pipeline.stream(call, codec)
            return await self.pipeline.complete(call, codec, request.receive)
        chat = t.chat_body(req, [*history, *new])
        if req.stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        codec = ResponsesCodec(req, t.new_id("resp"), self._keeper(turn, req, [*history, *new]))
        call = Call(turn=turn, messages=chat["messages"], body=chat, backend=backend, state=state)
        if req.stream:
            return await self.pipeline.stream(call, codec)
        return await self.pipeline.complete(call, codec, request.receive)

    def _native(self, model: str) -> bool:
        cfg = self.context.settings.model_by_name(model)
        return cfg is not None and cfg.responses == "native"

    async def _previous(self, turn: Turn, req: ResponsesRequest) -> StoredResponse | None:
        if not req.previous_response_id:
            return None
        found = None
        if self.store is not None:
            found = await asyncio.to_thread(self.store.get, turn.tenant, req.previous_response_id,
                                            turn.user)
        if found is None:
            raise NotFoundError(f"Previous response with id '{req.previous_response_id}' not "
                                "found.", param="previous_response_id",
                                code="previous_response_not_found")
        return found

    def _keeper(self, turn: Turn, req: ResponsesRequest,
                conversation: list[dict[str, Any]]) -> Any:
        """What stores the finished response (with ``store``; else nothing)."""
        store = self.store

        async def keep(response: dict[str, Any]) -> None:
            if store is None or not req.store:
                return
            record = StoredResponse(
                id=response["id"], tenant=turn.tenant, user=turn.user, response=response,
                input_items=t.input_items(req),
                conversation=[*conversation, *t.output_messages(response["output"])])
            try:
                await asyncio.to_thread(store.save, record)
            except Exception:
                # The answer exists: losing its stored copy (a full disk) must not cost
                # the client the answer. A later previous_response_id to it is a 404.
                log.exception("response %s could not be stored", record.id)

        return keep
