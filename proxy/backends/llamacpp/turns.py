"""Whose turn it is to use the local model: serving first, background work after.

One llama context runs one call at a time. Foreground calls (requests a client waits
for) take their turns in arrival order. Background calls (memory extraction) take a
turn only when no foreground call runs or waits, in arrival order among themselves;
so a request waits at most for the one background call already running (a bounded
one: extraction has ``max_tokens`` and a time limit).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Turns:
    """A lock with two queues: foreground (FIFO) before background (FIFO)."""

    def __init__(self) -> None:
        self._busy = False
        self._foreground: deque[asyncio.Future[None]] = deque()
        self._background: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def waiting(self) -> tuple[int, int]:
        """How many calls wait for a turn: (foreground, background)."""
        return (sum(not f.done() for f in self._foreground),
                sum(not f.done() for f in self._background))

    async def acquire(self, background: bool = False) -> None:
        """Wait for a turn. While the model is busy every newcomer queues, so an idle
        model has nobody waiting: the turn is handed from call to call in
        :meth:`release`."""
        if not self._busy:
            self._busy = True
            return
        queue = self._background if background else self._foreground
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn in queue:
                queue.remove(turn)
            if turn.done() and not turn.cancelled():
                self.release()  # handed the turn as it was cancelled: pass it on
            raise

    def release(self) -> None:
        """End the current turn: the next foreground call gets it, else the next
        background one, else the model is idle."""
        for queue in (self._foreground, self._background):
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)  # the turn passes on: still busy
                    return
        self._busy = False
