"""The memory layer the proxy talks to: recall before the backend, remember after.

A thin facade over the parts that do the work. Recall reads the mounted cubes'
activation blocks (:mod:`memory.blocks`) and searches (:mod:`memory.retrieval`) off
the event loop, then injects (:mod:`memory.inject`). Remember appends the exchange to
the durable outbox (:mod:`memory.outbox`); the write-back worker
(:mod:`memory.writeback`) hands batches to extraction (:mod:`memory.extract`), whose
plans are written through :mod:`memory.apply`. The memory API's side is ``admin``
(:mod:`memory.admin`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from memory.access import AccessRecorder
from memory.activation import Prefix
from memory.admin import MemoryAdmin, check_cubes
from memory.apply import Plan, Writer
from memory.blocks import BlockCache, PrefixChanged
from memory.embedding.base import Embedder
from memory.embedding.cache import CachingEmbedder
from memory.errors import MemoryLayerError, MemoryUnavailable
from memory.extract import FineExtractor, fast, new_user_turns
from memory.inject import TokenCounter, already_said, build_block, inject
from memory.layer import RECALL, WRITE_BACK, WRITE_BACK_DELAYED, Exchange, Recall, Turn
from memory.models import MemoryItem, default_cube_id, now
from memory.outbox import Outbox
from memory.retrieval import RetrievalConfig, Retriever
from memory.store.base import Hit, MemoryStore, Scope
from memory.store.guard import GuardedStore
from memory.writeback import WriteBackWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    enabled: bool = True
    top_k: int = 8
    max_tokens: int = 1024
    extraction: Literal["fast", "fine"] = "fast"
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    activation: bool = True  # activation blocks first in the prompt
    activation_tokens: int = 2048
    activation_refresh: float = 60.0  # seconds between recomputing blocks from access counts


def _rough_count(text: str) -> int:
    return len(text) // 4 + 1


class MemoryService:
    def __init__(self, *, store: MemoryStore, embedder: Embedder, outbox: Outbox,
                 config: MemoryConfig | None = None,
                 counter_for: Callable[[str], TokenCounter] | None = None,
                 fine: FineExtractor | None = None,
                 on_prefix_changed: PrefixChanged | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``counter_for(model)``: how a model counts tokens (memory blocks are budgeted
        in them). ``on_prefix_changed(model, prefix)``: a prefix in recent use changed
        (the local backend saves its new state). ``clock``: seconds, for block refreshes."""
        # Every store failure reaches us as MemoryUnavailable, whatever the backend.
        self.store: MemoryStore = store if isinstance(store, GuardedStore) else GuardedStore(store)
        self.embedder = embedder
        # Recall and write-back share recent vectors: a turn embedded as the query is
        # not embedded again when it is stored (memory/embedding/cache.py).
        self.vectors = CachingEmbedder(embedder)
        self.outbox = outbox
        self.config = config or MemoryConfig()
        self.counter_for = counter_for or (lambda model: _rough_count)
        self.fine = fine
        self.retriever = Retriever(self.store, self.vectors, self.config.retrieval)
        self.blocks = BlockCache(self.store, tokens=self.config.activation_tokens,
                                 refresh=self.config.activation_refresh,
                                 counter_for=self.counter_for,
                                 on_prefix_changed=on_prefix_changed, clock=clock)
        self.writer = Writer(self.store, self.vectors, self.blocks)
        self.admin = MemoryAdmin(self.store, self.writer, self.retriever, self.blocks)
        self.worker = WriteBackWorker(outbox, self._handle, probe=self._probe)
        self.access = AccessRecorder(self.store)
        self.recall_failed = False  # the latest recall found the store unavailable

    async def start(self) -> None:
        self.worker.start()
        if self.config.activation:
            await self.blocks.start()

    async def stop(self) -> None:
        # Fine extraction can take its LLM a minute per call: shutdown does not wait for
        # it. The batch in hand is cancelled (the local model stops generating at its
        # next token) and stays in the outbox, replayed on the next start. Write-back
        # stops first, so a block refresh waiting for the model is not stuck behind it.
        fine = self.fine is not None and self.config.extraction == "fine"
        await self.worker.stop(timeout=0 if fine else None)
        await self.blocks.stop()
        await self.access.stop()

    def close(self) -> None:
        self.worker.close()
        self.outbox.close()
        self.store.close()
        self.embedder.close()

    async def flush(self) -> None:
        """Every exchange acknowledged so far is written back, and every access counted.
        Raises :class:`MemoryUnavailable` while the store is down."""
        await self.worker.flush()
        await self.access.flush()

    async def _probe(self) -> None:
        """Raises unless write-back could go on now: the store takes reads and writes,
        and the embedder embeds."""
        await self.worker.run_blocking(self.store.probe)
        await self.worker.run_blocking(self.embedder.probe)
        self.recall_failed = False  # the store answered reads and writes just now

    def health(self) -> dict[str, Any]:
        """What is known now, without touching the store (cheap enough for /healthz)."""
        store_ok = not (self.worker.outage or self.recall_failed)
        return {"store": "ok" if store_ok else "unavailable",
                "outbox": "ok" if self.outbox.writable else "failing",
                "write_back": "paused" if self.worker.outage else "ok"}

    def _write_degraded(self, turn: Turn) -> list[str]:
        if not self._writes(turn):
            return []
        if not self.outbox.writable:
            return [WRITE_BACK]
        return [WRITE_BACK_DELAYED] if self.worker.outage else []

    def _writes(self, turn: Turn) -> bool:
        """Whether the turn's exchange is written back: ``write`` defaults to ``enabled``."""
        options = turn.options
        if not turn.personal and not options.get("write_cube"):
            return False  # no user named: nowhere of its own to write
        return self.config.enabled and bool(options.get("write", options.get("enabled", True)))

    # -- the request path -------------------------------------------------------------

    def _cubes(self, turn: Turn) -> list[str]:
        """The user's own cube (if the turn has one), then the mounted ones."""
        cubes = [default_cube_id(turn.tenant, turn.user)] if turn.personal else []
        for cube_id in turn.options.get("cubes") or []:
            if cube_id not in cubes:
                cubes.append(cube_id)
        return cubes

    async def recall(self, turn: Turn, messages: list[dict[str, Any]]) -> Recall:
        options = turn.options
        if not self.config.enabled or not options.get("enabled", True):
            if options.get("write_cube"):
                await asyncio.to_thread(self._check_write_cube, turn)
            return Recall(messages=messages, degraded=self._write_degraded(turn))
        top_k = options.get("top_k", self.config.top_k)
        query = " ".join(new_user_turns(messages))
        count = self.counter_for(turn.model)
        try:
            hits, prefix = await asyncio.to_thread(self._recall_hits, turn, messages, query,
                                                   top_k, count)
        except MemoryUnavailable as exc:
            self.recall_failed = True
            log.warning("request %s: recall skipped, %s", turn.request_id, exc.message)
            return Recall(messages=messages, degraded=[RECALL, *self._write_degraded(turn)])
        except MemoryLayerError:
            raise  # the request's own fault (a cube that does not exist)
        except Exception:
            # A bug in recall must not cost the request its answer either.
            log.exception("request %s: recall failed; answering without memory",
                          turn.request_id)
            return Recall(messages=messages, degraded=[RECALL, *self._write_degraded(turn)])
        self.recall_failed = False
        if self.config.activation and (cubes := self._cubes(turn)):
            self.blocks.used(turn.tenant, cubes, turn.model)
        held = prefix.memory_ids if prefix is not None else set()
        said = already_said(messages)
        fresh = [h.item for h in hits if h.item.id not in held and not said(h.item)][:top_k]
        budget = options.get("max_tokens", self.config.max_tokens)
        block, ids = build_block(fresh, budget, count)
        if ids:
            self.access.record(turn.tenant, ids, now())
        injected = [*(m for b in prefix.blocks for m in b.memory_ids), *ids] if prefix else ids
        return Recall(messages=inject(messages, block, prefix.message() if prefix else None),
                      memory_ids=injected, prefix=prefix, block=block,
                      degraded=self._write_degraded(turn))

    def _check_write_cube(self, turn: Turn) -> None:
        """A ``write_cube`` that does not exist is the request's fault: a 404 before the
        backend is called (and billed), not a failure after the reply."""
        cube = turn.options.get("write_cube")
        if not cube or not self._writes(turn):
            return
        try:
            check_cubes(self.store, turn.tenant, [cube], param="memory.write_cube")
        except MemoryUnavailable:
            pass  # recorded anyway: the worker checks the cube again before it writes

    def _recall_hits(self, turn: Turn, messages: list[dict[str, Any]], query: str, top_k: int,
                     count: TokenCounter) -> tuple[list[Hit], Prefix | None]:
        """One trip off the event loop: check the write cube and the mounted cubes, read
        their activation blocks, then search them."""
        self._check_write_cube(turn)
        cubes = self._cubes(turn)
        check_cubes(self.store, turn.tenant, cubes[1:] if turn.personal else cubes,
                    param="memory.cubes")
        if not cubes:
            return [], None
        prefix = self.blocks.prefix(turn.tenant, cubes, count) if self.config.activation else None
        if not query or top_k == 0:
            return [], prefix
        scope = Scope(tenant=turn.tenant, cube_ids=cubes)
        # Memories the request already holds are not injected (inject.already_said): ask
        # for as many more as it has user turns that could have become memories.
        said = sum(1 for m in messages if m.get("role") == "user")
        return self.retriever.search(scope, query, top_k + min(said, top_k)), prefix

    async def remember(self, turn: Turn, messages: list[dict[str, Any]],
                       reply: str | None) -> bool:
        if not self._writes(turn):
            return True
        exchange = Exchange.of(turn, messages, reply, at=now())
        try:
            await self.outbox.append(exchange)
        except (sqlite3.Error, OSError) as exc:
            # Not durably accepted: the caller tells the client so. The log carries the
            # error, never the exchange.
            log.error("request %s: write-back refused by the outbox (%s: %s); this exchange "
                      "will not be remembered", turn.request_id, type(exc).__name__, exc)
            return False
        self.worker.notify()
        return True

    # -- write-back ---------------------------------------------------------------------

    async def _handle(self, batch: list[Exchange]) -> None:
        plans: list[Plan] = []
        for exchange in batch:
            cube_id = exchange.options.get("write_cube") or default_cube_id(
                exchange.tenant, exchange.user)
            if self.fine is not None and self.config.extraction == "fine":
                async def similar(text: str, ex: Exchange = exchange,
                                  cube: str = cube_id) -> list[MemoryItem]:
                    hits = await self.worker.run_blocking(
                        self.retriever.search, Scope(tenant=ex.tenant, cube_ids=[cube]), text, 5)
                    return [h.item for h in hits]

                ops = await self.fine.extract(exchange, similar)
                # Fine decisions read the store, so each exchange lands before the next.
                await self.worker.run_blocking(self.writer.apply, [
                    Plan(exchange.tenant, exchange.user, cube_id, exchange.request_id, ops)])
            else:
                plans.append(Plan(exchange.tenant, exchange.user, cube_id, exchange.request_id,
                                  fast(exchange)))
        if plans:
            # One embedding batch and one upsert for the whole batch of exchanges.
            await self.worker.run_blocking(self.writer.apply, plans)
