"""Access counts, coalesced: recall notes which memories it injected; one background
write per interval records them all.

Counting is bookkeeping (it ranks the activation block's "hottest" memories), not
data: a request must not pay for it, and a write per request (a scroll and a payload
update per item, each through the store's write-ahead log) took about 2 ms of the
next request's time on two cores. Counts noted within one interval are summed per
item and written together; a crash loses at most that interval's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable

from memory.store.base import MemoryStore

log = logging.getLogger(__name__)


class AccessRecorder:
    def __init__(self, store: MemoryStore, *, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[str, tuple[Counter[str], int]] = {}  # tenant -> (counts, last at)
        self._timer: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()

    def record(self, tenant: str, memory_ids: Iterable[str], at: int) -> None:
        """Note accesses now (no I/O); they are written within ``interval`` seconds."""
        counts, last = self._pending.get(tenant, (Counter(), at))
        counts.update(memory_ids)
        self._pending[tenant] = (counts, max(last, at))
        if self._timer is None or self._timer.done():
            self._timer = asyncio.ensure_future(self._write_later())

    async def _write_later(self) -> None:
        await asyncio.sleep(self.interval)
        # Shielded: stopping cancels the wait, never a write half done.
        await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Write every access noted so far."""
        async with self._writing:
            pending, self._pending = self._pending, {}
            for tenant, (counts, at) in pending.items():
                try:
                    await asyncio.to_thread(self.store.touch, tenant, list(counts.elements()), at)
                except Exception as exc:  # bookkeeping must never take a request down
                    log.warning("recording memory access failed: %s", type(exc).__name__)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        await self.flush()
