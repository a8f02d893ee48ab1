"""A lean Server-Sent Events response for the chat stream.

Starlette's StreamingResponse starts an anyio task group per response to notice a
client leaving (under ASGI spec 2.3, which uvicorn speaks, ``send`` to a gone client
is silently dropped). One plain watcher task does the same for less: when the
client disconnects it cancels the streaming task, so the stream's own cleanup runs
(a local generation stops; the user turn is still written back).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        # Response.__init__ renders a body; a stream has none, so set what callers read.
        self.status_code = 200
        self.background = None
        self.frames = frames
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False
        complete = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            # uvicorn also answers "disconnect" once the response is complete.
            if not complete:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            complete = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left; that is not this task being cancelled
        finally:
            watcher.cancel()
            await self.frames.aclose()
