"""The worker thread that owns the llama context, and the bridge from it to the loop.

One llama context serves one request at a time. Requests wait their turn in
:class:`.turns.Turns`: in arrival order, with background work (memory extraction)
only when no request runs or waits. Generation runs on a single worker thread so the
event loop stays free, and hands tokens to the loop as they are made. A request
whose client leaves (or whose caller gives up on it) sets a flag the worker checks
between tokens; closing the worker sets every running generation's flag.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.backends.llamacpp.turns import Turns
from proxy.errors import ProxyError

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()
_READY = object()
#: A generated piece of text and the finish reason that came with it, if any.
Piece = tuple[str | None, str | None]


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """How the last generation ended: observable by tests and logs."""

    pieces: int
    cancelled: bool


class Worker:
    """The single worker thread of one model and the turn to use it."""

    def __init__(self, name: str) -> None:
        self._turns = Turns()
        self._running: set[threading.Event] = set()  # the cancel flags of generations
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        self.last_generation: GenerationStats | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker thread, after what it runs or has queued."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def waiting(self) -> tuple[int, int]:
        """Calls waiting for their turn: (foreground, background)."""
        return self._turns.waiting

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker thread in its turn: after the requests queued
        before it, with the context to itself."""
        loop = asyncio.get_running_loop()
        await self._turns.acquire()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._turns.release()

    async def idle(self) -> None:
        """Return once nothing runs or waits (those queued before it included)."""
        await self._turns.acquire(background=True)
        self._turns.release()

    def close(self) -> None:
        """Stop running generations at their next token, then let the thread go."""
        for cancel in list(self._running):
            cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def pieces(self, set_up: Callable[[], None], generate: Callable[[], Iterable[Any]],
                     prompt_in: Callable[[], None] | None = None, *,
                     background: bool = False) -> AsyncGenerator[Piece, None]:
        """(text, finish reason) as generated; first (None, None) once ``set_up`` has
        put the context in place. ``generate`` starts llama-cpp-python's stream of
        completion chunks; ``prompt_in`` is called when its first chunk comes (the
        prompt is evaluated by then). ``background``: wait until no foreground call
        runs or waits."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        await self._turns.acquire(background)
        try:
            future = loop.run_in_executor(
                self._executor, contextvars.copy_context().run, self._generate, set_up, generate,
                prompt_in, put, cancel,
            )
        except BaseException:
            self._turns.release()
            raise
        self._running.add(cancel)

        # The turn is held until the worker lets go of the llama context, however this
        # coroutine ends (a cancelled request must not let the next one in early).
        def done(_: object) -> None:
            self._running.discard(cancel)
            self._turns.release()

        future.add_done_callback(done)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if item is _READY:
                    yield None, None
                    continue
                if isinstance(item, BaseException):
                    log.error("local generation failed: %s", item)
                    raise ProxyError("local model failed to generate", code="model_error")
                assert isinstance(item, tuple)
                yield item
        finally:
            cancel.set()

    def _generate(self, set_up: Callable[[], None], generate: Callable[[], Iterable[Any]],
                  prompt_in: Callable[[], None] | None, put: Callable[[object], None],
                  cancel: threading.Event) -> None:
        pieces = 0
        try:
            set_up()
            put(_READY)
            for out in generate():
                if pieces == 0 and prompt_in is not None:  # the prompt is in
                    prompt_in()
                if cancel.is_set():
                    break
                pieces += 1
                choice = out["choices"][0]
                put((choice["text"], choice.get("finish_reason")))
        except Exception as exc:  # handed to the event loop, raised there
            put(exc)
        finally:
            self.last_generation = GenerationStats(pieces=pieces, cancelled=cancel.is_set())
            put(_END)
