"""The memory layer the proxy talks to: recall before the backend, remember after.

Reads (recall, search) run the store and embedder off the event loop. Writes from
chat go through the durable outbox and a background worker; writes from the memory
API apply at once. Every write is redacted, deduplicated against the cube, and
versioned: an update is a new version, a delete a new version marked deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from memory.access import AccessRecorder
from memory.activation import ActivationBlock, Prefix, make_prefix, select_block
from memory.embedding.base import Embedder
from memory.errors import InvalidMemoryRequest, MemoryLayerError, MemoryNotFound, MemoryUnavailable
from memory.extract import FineExtractor, Operation, fast, new_user_turns
from memory.extract import Turn as ExtractTurn
from memory.inject import TokenCounter, build_block, inject
from memory.layer import RECALL, WRITE_BACK, WRITE_BACK_DELAYED, Recall, Turn
from memory.models import (
    Cube,
    MemoryItem,
    MemoryStatus,
    MemoryType,
    Source,
    default_cube_id,
    normalise,
    now,
    stable_id,
    text_key,
)
from memory.outbox import Exchange, Outbox, WriteBackWorker
from memory.pieces import embed_with_pieces
from memory.redact import redact
from memory.retrieval import RetrievalConfig, Retriever
from memory.store.base import Hit, MemoryStore, Scope
from memory.store.guard import GuardedStore

log = logging.getLogger(__name__)


def _clean_context(context: str | None) -> str | None:
    """Context is written like text: redacted, and dropped when nothing is left."""
    return (redact(context).strip() or None) if context else None


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


#: Called with (model, prefix) when a prefix in recent use changed: the model's backend
#: may save the new prefix's state before the next request needs it.
PrefixListener = Callable[[str, Prefix], Awaitable[None]]
_RECENT_PREFIXES = 64
#: A block nobody read for this many refresh intervals is dropped from the cache.
_FORGET_AFTER_REFRESHES = 10


class MemoryService:
    def __init__(self, *, store: MemoryStore, embedder: Embedder, outbox: Outbox,
                 config: MemoryConfig | None = None,
                 counter_for: Callable[[str], TokenCounter] | None = None,
                 fine: FineExtractor | None = None) -> None:
        # Every store failure reaches us as MemoryUnavailable, whatever the backend.
        self.store: MemoryStore = store if isinstance(store, GuardedStore) else GuardedStore(store)
        self.embedder = embedder
        self.outbox = outbox
        self.config = config or MemoryConfig()
        self.retriever = Retriever(self.store, embedder, self.config.retrieval)
        self.counter_for = counter_for or (lambda model: lambda text: len(text) // 4 + 1)
        self.fine = fine
        self.worker = WriteBackWorker(outbox, self._handle, probe=self._probe)
        self.access = AccessRecorder(self.store)
        self.recall_failed = False  # the latest recall found the store unavailable
        # Activation blocks by (tenant, cube): the block and when it was computed.
        self._blocks: dict[tuple[str, str], tuple[ActivationBlock, float]] = {}
        self._used: dict[tuple[str, str], float] = {}  # when each block was last read
        self._block_lock = threading.Lock()
        self._dirty: set[tuple[str, str]] = set()
        # (tenant, mounted cubes, model) of recent requests with a prefix, oldest first.
        self._recent: OrderedDict[tuple[str, tuple[str, ...], str], None] = OrderedDict()
        self._listeners: list[PrefixListener] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._stopping = False
        self.block_refreshes = 0

    async def start(self) -> None:
        self.worker.start()
        if self.config.activation:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._refresher = asyncio.ensure_future(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None and self._wake is not None:
            # Not cancelled: a refresh in a worker thread finishes before the store closes.
            self._stopping = True
            self._wake.set()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.worker.stop()
        await self.access.stop()

    def add_prefix_listener(self, listener: PrefixListener) -> None:
        self._listeners.append(listener)

    async def flush(self) -> None:
        """Every exchange acknowledged so far is written back, and every access counted.
        Raises :class:`MemoryUnavailable` while the store is down."""
        await self.worker.flush()
        await self.access.flush()

    async def _probe(self) -> None:
        await self.worker.run_blocking(self.store.probe)
        self.recall_failed = False  # the store answered reads and writes just now

    def health(self) -> dict[str, Any]:
        """What is known now, without touching the store (cheap enough for /healthz)."""
        store_ok = not (self.worker.outage or self.recall_failed)
        return {"store": "ok" if store_ok else "unavailable",
                "outbox": "ok" if self.outbox.writable else "failing",
                "write_back": "paused" if self.worker.outage else "ok"}

    def _write_degraded(self, turn: Turn) -> list[str]:
        if not self.config.enabled or not turn.options.get("write", True):
            return []
        if not self.outbox.writable:
            return [WRITE_BACK]
        return [WRITE_BACK_DELAYED] if self.worker.outage else []

    def close(self) -> None:
        self.worker.close()
        self.outbox.close()
        self.store.close()
        self.embedder.close()

    # -- the request path -------------------------------------------------------------

    def _cubes(self, turn: Turn) -> list[str]:
        cubes = [default_cube_id(turn.tenant, turn.user)]
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
            hits, prefix = await asyncio.to_thread(self._recall_hits, turn, query, top_k, count)
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
        if self.config.activation:
            self._note_recent(turn)
        held = prefix.memory_ids if prefix is not None else set()
        budget = options.get("max_tokens", self.config.max_tokens)
        block, ids = build_block([h.item for h in hits if h.item.id not in held], budget, count)
        if ids:
            self.access.record(turn.tenant, ids, now())
        injected = [*(m for b in prefix.blocks for m in b.memory_ids), *ids] if prefix else ids
        return Recall(messages=inject(messages, block, prefix.message() if prefix else None),
                      memory_ids=injected, prefix=prefix, degraded=self._write_degraded(turn))

    def _check_write_cube(self, turn: Turn) -> None:
        """A ``write_cube`` that does not exist is the request's fault: a 404 before the
        backend is called (and billed), not a failure after the reply."""
        cube = turn.options.get("write_cube")
        if not cube or not self.config.enabled or not turn.options.get("write", True):
            return
        try:
            self._check_cubes(turn.tenant, [cube], param="memory.write_cube")
        except MemoryUnavailable:
            pass  # recorded anyway: the worker checks the cube again before it writes

    def _recall_hits(self, turn: Turn, query: str, top_k: int,
                     count: TokenCounter) -> tuple[list[Hit], Prefix | None]:
        """One trip off the event loop: check the write cube and the mounted cubes, read
        their activation blocks, then search them."""
        self._check_write_cube(turn)
        cubes = self._cubes(turn)
        self._check_cubes(turn.tenant, cubes[1:], param="memory.cubes")
        prefix = None
        if self.config.activation:
            prefix = make_prefix(turn.tenant,
                                 [self._block(turn.tenant, c, count) for c in cubes])
        if not query or top_k == 0:
            return [], prefix
        scope = Scope(tenant=turn.tenant, cube_ids=cubes)
        return self.retriever.search(scope, query, top_k), prefix

    # -- activation blocks --------------------------------------------------------------

    def _block(self, tenant: str, cube_id: str, count: TokenCounter,
               *, fresh: bool = False) -> ActivationBlock:
        """A cube's block: cached until its cube changes in a way that can alter it
        (pins, edits, deletes: at once) or access counts move it (every refresh)."""
        key = (tenant, cube_id)
        if not fresh:
            self._used[key] = time.monotonic()
        cached = self._blocks.get(key)
        if cached is not None and not fresh and key not in self._dirty:
            return cached[0]
        with self._block_lock:  # recall and the refresh may both recompute; one at a time
            return self._compute_block(tenant, cube_id, count)

    def _compute_block(self, tenant: str, cube_id: str, count: TokenCounter) -> ActivationBlock:
        key = (tenant, cube_id)
        self._dirty.discard(key)
        # Every line costs some 10 tokens at least (dash, date), so no more than this fit.
        limit = self.config.activation_tokens // 8 + 1
        items = self.store.block_candidates(tenant, cube_id, limit)
        block = select_block(tenant, cube_id, items, self.config.activation_tokens, count)
        self._blocks[key] = (block, time.monotonic())
        self.block_refreshes += 1
        return block

    def _changed(self, tenant: str, cube_id: str) -> None:
        """A write through the API or fine extraction: the cube's block may differ."""
        key = (tenant, cube_id)
        if key not in self._blocks:
            return
        self._dirty.add(key)
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _note_recent(self, turn: Turn) -> None:
        key = (turn.tenant, tuple(self._cubes(turn)), turn.model)
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_PREFIXES:
            self._recent.popitem(last=False)

    async def _refresh_loop(self) -> None:
        assert self._wake is not None
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the wait ends, and stop() would hang.
            try:
                async with asyncio.timeout(self.config.activation_refresh):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._stopping:
                return
            self._wake.clear()
            try:
                await self.refresh_blocks()
            except Exception:  # a failed refresh must not stop later ones
                log.exception("activation block refresh failed")

    async def refresh_blocks(self) -> int:
        """Recompute changed blocks, and stale ones read since they were computed; drop
        those nobody read for a while; hand each recently used prefix whose blocks
        changed to the listeners. Returns how many prefixes changed."""
        clock = time.monotonic()
        stale_after = clock - self.config.activation_refresh
        forget_before = clock - _FORGET_AFTER_REFRESHES * self.config.activation_refresh
        changed: set[tuple[str, str]] = set()
        for (tenant, cube_id), (old, at) in list(self._blocks.items()):
            key = (tenant, cube_id)
            used = self._used.get(key, at)
            if used < forget_before:  # nobody asked for it in a while: recomputed when asked
                self._blocks.pop(key, None)
                self._used.pop(key, None)
                self._dirty.discard(key)
                continue
            if not (key in self._dirty or (at <= stale_after and used > at)):
                continue
            model = next((m for t, cs, m in reversed(self._recent) if t == tenant and cube_id in cs),
                         None)
            count = self.counter_for(model or "")
            new = await asyncio.to_thread(self._block, tenant, cube_id, count, fresh=True)
            if new.version != old.version:
                changed.add(key)
        notified = 0
        for tenant, cubes, model in list(self._recent):
            if not any((tenant, c) in changed for c in cubes):
                continue
            prefix = make_prefix(tenant, [self._blocks[(tenant, c)][0] for c in cubes
                                          if (tenant, c) in self._blocks])
            if prefix is None:
                continue
            notified += 1
            for listener in self._listeners:
                try:
                    await listener(model, prefix)
                except Exception:
                    log.exception("activation prefix listener failed")
        return notified

    def _check_cubes(self, tenant: str, cube_ids: Iterable[str], *, param: str) -> None:
        for cube_id in cube_ids:
            if self.store.get_cube(tenant, cube_id) is None:
                raise MemoryNotFound(f"No cube '{cube_id}'.", param=param)

    async def remember(self, turn: Turn, messages: list[dict[str, Any]],
                       reply: str | None) -> bool:
        if not self.config.enabled or not turn.options.get("write", True):
            return True
        exchange = Exchange(request_id=turn.request_id, tenant=turn.tenant, user=turn.user,
                            session_id=turn.session_id, model=turn.model,
                            messages=list(messages), reply=reply,
                            options=dict(turn.options), at=now())
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
        plans: list[tuple[str, str, str, str, list[Operation]]] = []
        for exchange in batch:
            turn = ExtractTurn(request_id=exchange.request_id, session_id=exchange.session_id,
                               at=exchange.at, messages=exchange.messages, reply=exchange.reply)
            cube_id = exchange.options.get("write_cube") or default_cube_id(
                exchange.tenant, exchange.user)
            if self.fine is not None and self.config.extraction == "fine":
                async def similar(text: str, ex: Exchange = exchange,
                                  cube: str = cube_id) -> list[MemoryItem]:
                    hits = await self.worker.run_blocking(
                        self.retriever.search, Scope(tenant=ex.tenant, cube_ids=[cube]), text, 5)
                    return [h.item for h in hits]

                ops = await self.fine.extract(turn, similar)
                # Fine decisions read the store, so each exchange lands before the next.
                await self.worker.run_blocking(self._apply_many, [
                    (exchange.tenant, exchange.user, cube_id, exchange.request_id, ops)])
            else:
                plans.append((exchange.tenant, exchange.user, cube_id, exchange.request_id,
                              fast(turn)))
        if plans:
            # One embedding batch and one upsert for the whole batch of exchanges.
            await self.worker.run_blocking(self._apply_many, plans)

    def _ensure_default_cube(self, tenant: str, user: str, cube_id: str) -> None:
        if cube_id == default_cube_id(tenant, user) and self.store.get_cube(tenant, cube_id) is None:
            self.store.put_cube(Cube(id=cube_id, tenant=tenant, name=f"{user} (default)",
                                     kind="user", owner=user))

    def _cube_ready(self, tenant: str, user: str, cube_id: str) -> bool:
        """The write cube exists (a user's default cube is made). A chat names its write
        cube before the store may be asked (it was down), or the cube may be deleted
        since: an exchange never writes into a cube that is not there."""
        if cube_id == default_cube_id(tenant, user):
            self._ensure_default_cube(tenant, user, cube_id)
            return True
        return self.store.get_cube(tenant, cube_id) is not None

    def _stored_texts(self, plans: Sequence[tuple[str, str, str, str, list[Operation]]],
                      texts: Sequence[Sequence[str]]) -> set[tuple[str, str, str]]:
        """(tenant, cube, text key) of every ADD in the batch that its cube already holds:
        one index lookup per cube, not a search per memory. ``texts``: each plan's
        operation texts, already redacted."""
        wanted: dict[tuple[str, str], set[str]] = {}
        for (tenant, _user, cube_id, _request, ops), cleaned in zip(plans, texts, strict=True):
            keys = wanted.setdefault((tenant, cube_id), set())
            keys.update(text_key(t) for op, t in zip(ops, cleaned, strict=True)
                        if op.kind == "ADD" and t)
        return {(tenant, cube_id, key) for (tenant, cube_id), keys in wanted.items() if keys
                for key in self.store.existing_texts(tenant, cube_id, sorted(keys))}

    def _apply_many(self, plans: Sequence[tuple[str, str, str, str, list[Operation]]]
                    ) -> list[MemoryItem]:
        writes: list[MemoryItem] = []
        # Redacted once: the duplicate check and the write both read these.
        texts = [[redact(op.text).strip() for op in plan[4]] for plan in plans]
        # (tenant, cube, text key): in the store already, or written earlier in this batch
        written = self._stored_texts(plans, texts)
        cubes_seen: dict[tuple[str, str], bool] = {}
        stamp = now()
        for (tenant, user, cube_id, request_id, ops), cleaned in zip(plans, texts, strict=True):
            if (tenant, cube_id) not in cubes_seen:
                cubes_seen[(tenant, cube_id)] = self._cube_ready(tenant, user, cube_id)
            if not cubes_seen[(tenant, cube_id)]:
                log.warning("write-back of request %s skipped: its cube is gone", request_id)
                continue
            for index, (op, text) in enumerate(zip(ops, cleaned, strict=True)):
                if op.kind == "ADD":
                    key = (tenant, cube_id, text_key(text))
                    if not text or key in written:
                        continue
                    written.add(key)
                    writes.append(MemoryItem(
                        id=stable_id("memory", tenant, cube_id, request_id, str(index)),
                        tenant=tenant, cube_id=cube_id, user=user, text=text, type=op.type,
                        context=_clean_context(op.context),
                        created_at=min((s.at for s in op.sources), default=stamp),
                        updated_at=stamp, sources=op.sources, extractor=op.extractor))
                elif op.kind in ("UPDATE", "DELETE") and op.target:
                    current = self.store.get(tenant, op.target)
                    if current is None or any(s.request_id == request_id for s in current.sources):
                        continue  # gone, or this exchange already applied it (a replay)
                    changes: dict[str, Any] = {
                        "version": current.version + 1, "updated_at": stamp,
                        "sources": [*current.sources, *op.sources], "extractor": op.extractor}
                    if op.kind == "UPDATE" and text:
                        changes["text"] = text
                    else:
                        changes["status"] = "deleted"
                    writes.append(current.model_copy(update=changes))
        self._write(writes)
        return writes

    def _write(self, items: Sequence[MemoryItem]) -> None:
        if items:
            texts = [i.text for i in items]
            if self.store.multivector:  # one embedding batch for texts and their pieces
                vectors, pieces = embed_with_pieces(self.embedder, texts)
                self.store.upsert(items, vectors, pieces)
            else:
                self.store.upsert(items, self.embedder.embed(texts))
            for item in items:
                cached = self._blocks.get((item.tenant, item.cube_id))
                if cached is not None and (item.pinned or item.id in cached[0].memory_ids):
                    self._changed(item.tenant, item.cube_id)

    # -- the memory API -----------------------------------------------------------------

    def create(self, tenant: str, user: str, text: str, *, cube_id: str | None = None,
               context: str | None = None, type: MemoryType = "fact", tags: Sequence[str] = (),
               pinned: bool = False, created_at: int | None = None, sources: Sequence[Source] = (),
               memory_id: str | None = None) -> MemoryItem:
        return self.create_many(tenant, [{
            "user": user, "text": text, "cube_id": cube_id, "context": context, "type": type,
            "tags": list(tags), "pinned": pinned, "created_at": created_at, "sources": list(sources),
            "id": memory_id}])[0]

    def create_many(self, tenant: str, items: Sequence[dict[str, Any]]) -> list[MemoryItem]:
        """Memories written at once (one embedding batch). A spec holds ``user``, ``text``
        and optionally ``cube_id`` (default: the user's cube), ``context``, ``type``,
        ``tags``, ``pinned``, ``created_at``, ``sources`` and ``id``."""
        made: list[MemoryItem] = []
        stamp = now()
        checked: set[str] = set()
        for spec in items:
            user = spec["user"]
            cube = spec.get("cube_id") or default_cube_id(tenant, user)
            if cube not in checked:
                self._ensure_default_cube(tenant, user, cube)
                self._check_cubes(tenant, [cube], param="cube_id")
                checked.add(cube)
            clean = redact(spec["text"]).strip()
            if not clean:
                raise InvalidMemoryRequest("text must not be empty.", param="text")
            made.append(MemoryItem(
                id=spec.get("id") or str(uuid.uuid4()), tenant=tenant, cube_id=cube, user=user,
                text=clean, context=_clean_context(spec.get("context")),
                type=spec.get("type") or "fact", tags=list(spec.get("tags") or []),
                pinned=bool(spec.get("pinned")), created_at=spec.get("created_at") or stamp,
                updated_at=stamp, sources=list(spec.get("sources") or []), extractor="api"))
        self._write(made)
        return made

    def get(self, tenant: str, memory_id: str) -> MemoryItem:
        item = self.store.get(tenant, memory_id)
        if item is None:
            raise MemoryNotFound(f"No memory '{memory_id}'.")
        return item

    def patch(self, tenant: str, memory_id: str, changes: dict[str, Any]) -> MemoryItem:
        current = self.get(tenant, memory_id)
        allowed = {"text", "type", "tags", "pinned", "status"}
        update = {k: v for k, v in changes.items() if k in allowed and v is not None}
        if "text" in update:
            update["text"] = redact(update["text"]).strip()
            if not update["text"]:
                raise InvalidMemoryRequest("text must not be empty.", param="text")
        item = current.model_copy(update={**update, "version": current.version + 1,
                                          "updated_at": now(), "extractor": "api"})
        self._write([item])
        return item

    def delete(self, tenant: str, memory_id: str) -> MemoryItem:
        return self.patch(tenant, memory_id, {"status": "deleted"})

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        versions = self.store.history(tenant, memory_id)
        if not versions:
            raise MemoryNotFound(f"No memory '{memory_id}'.")
        return versions

    def search(self, tenant: str, query: str, *, user: str | None = None,
               cube_ids: Sequence[str] | None = None, top_k: int = 10,
               statuses: Sequence[MemoryStatus] = ("active",)) -> list[Hit]:
        if cube_ids:
            self._check_cubes(tenant, cube_ids, param="cubes")
        scope = Scope(tenant=tenant, cube_ids=list(cube_ids) if cube_ids else None, user=user,
                      statuses=tuple(statuses))
        return self.retriever.search(scope, query, top_k)

    def purge_user(self, tenant: str, user: str) -> int:
        removed = self.store.purge_user(tenant, user)
        for t, cube_id in list(self._blocks):
            if t == tenant:
                self._changed(t, cube_id)
        return removed

    # -- cubes --------------------------------------------------------------------------

    def create_cube(self, tenant: str, name: str, *, description: str = "",
                    cube_id: str | None = None) -> Cube:
        cube = Cube(id=cube_id or f"cube_{uuid.uuid4().hex}", tenant=tenant, name=name,
                    kind="shared", description=description)
        if self.store.get_cube(tenant, cube.id) is not None:
            raise InvalidMemoryRequest(f"Cube '{cube.id}' exists.", param="id")
        self.store.put_cube(cube)
        return cube

    def get_cube(self, tenant: str, cube_id: str) -> Cube:
        cube = self.store.get_cube(tenant, cube_id)
        if cube is None:
            raise MemoryNotFound(f"No cube '{cube_id}'.")
        return cube

    def delete_cube(self, tenant: str, cube_id: str) -> int:
        self.get_cube(tenant, cube_id)
        removed = self.store.delete_cube_items(tenant, cube_id)
        self.store.delete_cube(tenant, cube_id)
        self._changed(tenant, cube_id)
        return removed

    def _all(self, tenant: str, cube_id: str) -> list[MemoryItem]:
        items: list[MemoryItem] = []
        cursor: str | None = None
        while True:
            page, cursor = self.store.list_items(tenant, cube_id=cube_id, limit=500, cursor=cursor)
            items += page
            if cursor is None:
                return items

    def export_cube(self, tenant: str, cube_id: str) -> Iterable[str]:
        """JSONL: the cube first, then every version of every item."""
        cube = self.get_cube(tenant, cube_id)
        yield json.dumps({"object": "cube", **cube.model_dump(exclude={"tenant"})}) + "\n"
        for item in self._all(tenant, cube_id):
            for version in self.store.history(tenant, item.id):
                yield json.dumps({"object": "memory", **version.model_dump(exclude={"tenant"})}) + "\n"

    def import_cube(self, tenant: str, lines: Iterable[str]) -> tuple[Cube, int]:
        cube: Cube | None = None
        versions: list[MemoryItem] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind = record.pop("object")
                if kind == "cube":
                    cube = Cube(tenant=tenant, **record)
                elif kind == "memory":
                    versions.append(MemoryItem(tenant=tenant, **record))
                else:
                    raise ValueError(f"unknown object {kind!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidMemoryRequest(f"line {number}: {exc}") from None
        if cube is None:
            raise InvalidMemoryRequest("the export has no cube line.")
        if any(v.cube_id != cube.id for v in versions):
            raise InvalidMemoryRequest("every memory must belong to the exported cube.")
        self.store.put_cube(cube)
        # Oldest versions first, so each item's newest ends up current.
        versions.sort(key=lambda v: v.version)
        for v in versions:
            v.text = redact(v.text)
        self._write(versions)
        return cube, len({v.id for v in versions})

    def merge_cubes(self, tenant: str, source_id: str, target_id: str) -> int:
        """Copy the source's active items into the target, skipping texts it has."""
        self.get_cube(tenant, source_id)
        self.get_cube(tenant, target_id)
        have = {normalise(i.text) for i in self._all(tenant, target_id) if i.status == "active"}
        copies: list[MemoryItem] = []
        stamp = now()
        for item in self._all(tenant, source_id):
            key = normalise(item.text)
            if item.status != "active" or key in have:
                continue
            have.add(key)
            copies.append(item.model_copy(update={
                "id": stable_id("merge", tenant, target_id, item.id), "cube_id": target_id,
                "version": 1, "updated_at": stamp, "extractor": "merge"}))
        self._write(copies)
        return len(copies)
