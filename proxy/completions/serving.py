"""Text completions through the memory pipeline: the request's turn, the view of a
backend's text-completion methods that the pipeline calls, and the ``text_completion``
encoding of replies and streams (``data: <chunk>`` frames, an error frame, ``[DONE]``).

A text completion has no messages, so memory stays out of it unless the body's
``memory`` object asks for it. Then the prompts are the user turns memory reads (the
recall query) and writes back, and what recall injects (activation blocks, retrieved
memories) goes before each prompt as text; an echo shows the client's prompt, never
the memories.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.backends.base import ChatBackend, Completion, RequestContext, StreamEvent
from proxy.chat.serving import DONE_FRAME, sse_frame
from proxy.completions.protocol import parse_completion_request
from proxy.context import AppContext
from proxy.errors import ProxyError
from proxy.pipeline import Call, Pipeline, begin

#: Memory off: nothing recalled, nothing written back (a ``memory`` object turns it on).
NO_MEMORY: dict[str, Any] = {"enabled": False, "write": False}


def choice_text(data: dict[str, Any], index: int = 0) -> str | None:
    """The text of choice ``index`` of a text_completion or one of its chunks (None: the
    object has no such choice)."""
    for choice in data.get("choices") or []:
        if isinstance(choice, dict) and choice.get("index", 0) == index:
            text = choice.get("text")
            return text if isinstance(text, str) else ""
    return None


class CompletionsCodec:
    """OpenAI's text-completion encoding; relayed JSON is not encoded again. The text
    written back is the first choice's, without the prompt an echo put before it."""

    def __init__(self, echoed: str | None = None) -> None:
        self.echoed = echoed or ""
        self._skip = len(self.echoed)  # echo characters not yet seen on a stream

    def reply_text(self, completion: Completion) -> str:
        return (choice_text(completion.data) or "").removeprefix(self.echoed)

    async def render(self, completion: Completion) -> bytes:
        if completion.raw is not None:
            return completion.raw
        return json.dumps(completion.data).encode()

    def encode(self, group: list[StreamEvent], text: list[str]) -> bytes:
        out = []
        for event in group:
            piece = choice_text(event.data) or ""
            if self._skip:
                cut = min(self._skip, len(piece))
                piece, self._skip = piece[cut:], self._skip - cut
            text.append(piece)
            raw = event.raw if event.raw is not None else json.dumps(
                event.data, separators=(",", ":")).encode()
            out.append(b"data: " + raw + b"\n\n")
        return b"".join(out)

    def error(self, exc: ProxyError) -> bytes:
        return sse_frame(exc.body())

    async def end(self, reply: str | None) -> bytes:
        return DONE_FRAME


class TextCompletions(ChatBackend):
    """A backend's text completions, called as the pipeline calls a backend.

    The pipeline hands over the body with ``messages``: the prompts as user turns, after
    whatever recall injected. Injected text goes before each prompt; without any, the
    body reaches the backend as the client sent it (a relay forwards it as-is)."""

    def __init__(self, backend: ChatBackend, prompts: list[str] | None) -> None:
        self.backend = backend
        #: The prompts memory reads (None: memory is off, the body is not touched).
        self.prompts = prompts
        self.cancel_on_disconnect = backend.cancel_on_disconnect
        self.takes_lora_files = backend.takes_lora_files

    def _body(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
        """The body for the backend, and the prompts to echo here (None: the backend
        echoes, if asked)."""
        body = dict(body)
        messages: list[dict[str, Any]] = body.pop("messages", None) or []
        prompts = self.prompts
        injected = messages[:len(messages) - len(prompts)] if prompts else []
        memory = "\n\n".join(str(m.get("content") or "") for m in injected).strip()
        if not prompts or not memory:
            return body, None
        primed = [f"{memory}\n\n{p}" for p in prompts]
        body["prompt"] = primed[0] if isinstance(body.get("prompt"), str) else primed
        if not body.get("echo"):
            return body, None
        body["echo"] = False  # the client's prompt is echoed, not the memories before it
        return body, prompts

    @staticmethod
    def _echo(data: dict[str, Any], prompts: list[str], per_prompt: int,
              pending: set[int] | None = None) -> None:
        """Put each choice's prompt before its text (on a stream: before the first text
        of each choice, ``pending`` holding the choices still to start)."""
        for choice in data.get("choices") or []:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if not isinstance(index, int) or (pending is not None and index not in pending):
                continue
            if pending is not None:
                pending.discard(index)
            prompt = prompts[min(index // per_prompt, len(prompts) - 1)]
            choice["text"] = prompt + str(choice.get("text") or "")

    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        sent, echo = self._body(body)
        completion = await self.backend.text_complete(sent, ctx)
        if echo is None:
            return completion
        self._echo(completion.data, echo, int(body.get("n") or 1))
        return Completion(data=completion.data)  # changed: no longer the upstream's bytes

    async def stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        sent, echo = self._body(body)
        groups = self.backend.text_stream_events(sent, ctx)
        pending = set(range(len(echo) * int(body.get("n") or 1))) if echo else set()
        try:
            async for group in groups:
                if pending and echo is not None:
                    for event in group:
                        self._echo(event.data, echo, int(body.get("n") or 1), pending)
                        event.raw = None
                yield group
        finally:
            await groups.aclose()

    async def stream(self, body: dict[str, Any],
                     ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        groups = self.stream_events(body, ctx)
        try:
            async for group in groups:
                for event in group:
                    yield event.data
        finally:
            await groups.aclose()


class CompletionsServing:
    def __init__(self, context: AppContext) -> None:
        self.context = context
        self.pipeline = Pipeline(context)

    async def handle(self, request: Request) -> Response:
        body, req = parse_completion_request(await request.body())
        backend = self.context.backend(req.model)
        body.pop("memory", None)
        texts = req.texts()  # None for token ids, which memory refuses (protocol)
        turn, state = begin(request, req.model, req.user, req.memory.model_dump(
            exclude_none=True) if req.memory else dict(NO_MEMORY))
        messages = [{"role": "user", "content": t} for t in texts or []]
        view = TextCompletions(backend, texts if req.memory else None)
        call = Call(turn=turn, messages=messages, body=body, backend=view, state=state)
        codec = CompletionsCodec(texts[0] if req.echo and texts else None)
        if req.stream:
            return await self.pipeline.stream(call, codec)
        return await self.pipeline.complete(call, codec, request.receive)
