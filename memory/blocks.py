"""Activation blocks as requests use them: a cache per (tenant, cube), and the
scheduler that keeps them fresh (MemOS's activation memory, on the plaintext side).

A cube's block (:func:`memory.activation.select_block`) is cached until the cube changes
in a way that can alter it: a write of a pinned item or of one in the block applies at
once (the block is marked dirty and the scheduler woken); access counts move it at
most once per refresh interval. The scheduler recomputes dirty blocks, and stale ones
read since they were computed; forgets blocks nobody read for ten intervals; and hands
every recently used prefix whose blocks changed to ``on_prefix_changed``, so a local
backend saves the new prefix's state before the next request needs it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from memory.activation import ActivationBlock, Prefix, make_prefix, select_block
from memory.inject import TokenCounter
from memory.models import MemoryItem
from memory.store.base import MemoryStore

log = logging.getLogger(__name__)

#: Called with (model, prefix) when a prefix in recent use changed.
PrefixChanged = Callable[[str, Prefix], Awaitable[None]]
_RECENT_PREFIXES = 64
#: A block nobody read for this many refresh intervals is dropped from the cache.
_FORGET_AFTER_REFRESHES = 10

Key = tuple[str, str]  # (tenant, cube id)


@dataclass(slots=True)
class _Cached:
    block: ActivationBlock
    computed_at: float


class BlockCache:
    def __init__(self, store: MemoryStore, *, tokens: int, refresh: float,
                 counter_for: Callable[[str], TokenCounter],
                 on_prefix_changed: PrefixChanged | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.tokens = tokens
        self.refresh_seconds = refresh
        self.counter_for = counter_for
        self.on_prefix_changed = on_prefix_changed
        self.clock = clock
        #: Blocks computed so far (tests and logs read it).
        self.computed = 0
        self._cached: dict[Key, _Cached] = {}
        self._used: dict[Key, float] = {}  # when each block was last read
        self._dirty: set[Key] = set()
        self._lock = threading.Lock()  # recall and the scheduler may both recompute
        # (tenant, mounted cubes, model) of recent requests, oldest first: an ordered
        # set, read newest first to find the model a cube was last used with.
        self._recent: OrderedDict[tuple[str, tuple[str, ...], str], None] = OrderedDict()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def held(self) -> set[Key]:
        """The (tenant, cube) pairs whose block is cached now."""
        return set(self._cached)

    # -- the request path -------------------------------------------------------------

    def prefix(self, tenant: str, cubes: Sequence[str], count: TokenCounter) -> Prefix | None:
        """The blocks of these cubes as a prompt's first message (blocking: may read the
        store)."""
        return make_prefix(tenant, [self.block(tenant, c, count) for c in cubes])

    def block(self, tenant: str, cube_id: str, count: TokenCounter, *,
              fresh: bool = False) -> ActivationBlock:
        key = (tenant, cube_id)
        if not fresh:
            self._used[key] = self.clock()
        cached = self._cached.get(key)
        if cached is not None and not fresh and key not in self._dirty:
            return cached.block
        with self._lock:
            return self._compute(tenant, cube_id, count)

    def _compute(self, tenant: str, cube_id: str, count: TokenCounter) -> ActivationBlock:
        key = (tenant, cube_id)
        self._dirty.discard(key)
        # Every line costs some 10 tokens at least (dash, date), so no more than this fit.
        limit = self.tokens // 8 + 1
        items = self.store.block_candidates(tenant, cube_id, limit)
        block = select_block(tenant, cube_id, items, self.tokens, count)
        self._cached[key] = _Cached(block, self.clock())
        self.computed += 1
        return block

    def used(self, tenant: str, cubes: Sequence[str], model: str) -> None:
        """A request of ``model`` mounted these cubes (the scheduler warms its prefix)."""
        key = (tenant, tuple(cubes), model)
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_PREFIXES:
            self._recent.popitem(last=False)

    # -- what writes tell it ----------------------------------------------------------

    def written(self, items: Iterable[MemoryItem]) -> None:
        """These versions were written: a block holding one, or any block of a cube that
        got a pinned item, may differ now."""
        for item in items:
            cached = self._cached.get((item.tenant, item.cube_id))
            if cached is not None and (item.pinned or item.id in cached.block.memory_ids):
                self.changed(item.tenant, item.cube_id)

    def changed(self, tenant: str, cube_id: str) -> None:
        key = (tenant, cube_id)
        if key not in self._cached:
            return
        self._dirty.add(key)
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def tenant_changed(self, tenant: str) -> None:
        for t, cube_id in list(self._cached):
            if t == tenant:
                self.changed(t, cube_id)

    # -- the scheduler ----------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None and self._wake is not None:
            # Not cancelled: a refresh in a worker thread finishes before the store closes.
            self._stopping = True
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the wait ends, and stop() would hang.
            try:
                async with asyncio.timeout(self.refresh_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._stopping:
                return
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a failed refresh must not stop later ones
                log.exception("activation block refresh failed")

    async def refresh(self) -> int:
        """Recompute changed blocks, and stale ones read since they were computed; drop
        those nobody read for a while; hand each recently used prefix whose blocks
        changed to ``on_prefix_changed``. Returns how many prefixes changed."""
        now = self.clock()
        stale_after = now - self.refresh_seconds
        forget_before = now - _FORGET_AFTER_REFRESHES * self.refresh_seconds
        changed: set[Key] = set()
        for key, cached in list(self._cached.items()):
            used = self._used.get(key, cached.computed_at)
            if used < forget_before:  # nobody asked for it in a while: recomputed when asked
                self._cached.pop(key, None)
                self._used.pop(key, None)
                self._dirty.discard(key)
                continue
            if not (key in self._dirty or (cached.computed_at <= stale_after and used > cached.computed_at)):
                continue
            tenant, cube_id = key
            model = next((m for t, cs, m in reversed(self._recent) if t == tenant and cube_id in cs),
                         None)
            new = await asyncio.to_thread(self.block, tenant, cube_id, self.counter_for(model or ""),
                                          fresh=True)
            if new.version != cached.block.version:
                changed.add(key)
        notified = 0
        for tenant, cubes, model in list(self._recent):
            if not any((tenant, c) in changed for c in cubes):
                continue
            prefix = make_prefix(tenant, [self._cached[(tenant, c)].block for c in cubes
                                          if (tenant, c) in self._cached])
            if prefix is None:
                continue
            notified += 1
            if self.on_prefix_changed is not None:
                try:
                    await self.on_prefix_changed(model, prefix)
                except Exception:
                    log.exception("activation prefix listener failed")
        return notified
