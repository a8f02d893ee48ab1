"""The Qdrant-backed store, written once over an engine (``memory.store.engines``).

Every version of an item is its own point (``memory.store.layout``); exactly one per
item id is flagged current, and the highest version stored wins whatever order writes
land in: an upsert writes its points, then settles the flags of their item ids
(``layout.stale_currents``). Where one process owns the store (Edge) the two steps
run under the engine's write lock; a server's replicas share no lock, so there each
writer settles after writing, and ``touch`` is read-modify-write: concurrent touches
of one item may count once.

A store opened with ``connect_later`` (a server unreachable at start) opens on the
first call that finds it reachable; see ``_connect``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from memory.models import Cube, MemoryItem, MemoryStatus
from memory.store.base import Hit, MemoryStore, Scope, StoreError, StoreUnavailable
from memory.store.engines.base import Engine, Point, Record, Scored
from memory.store.layout import (
    ACCESS_FIELD,
    LATER_INDEXES,
    PINNED_FIELD,
    PROBE_ID,
    SCOPE_FIELD,
    TEXT_KEY_FIELD,
    UNFLAG,
    batch_currents,
    check_meta,
    check_pieces,
    cube_payload,
    cube_point_id,
    decode_cursor,
    dense_query,
    dense_value,
    encode_cursor,
    is_multivector,
    item_payload,
    meta,
    payload_cube,
    payload_item,
    ranked,
    scope_groups,
    stale_currents,
    touch_groups,
    unique_items,
)
from memory.store.sparse import sparse_item, sparse_query
from memory.store.where import (
    EVERYTHING,
    HasIds,
    Match,
    Where,
    active_where,
    chunks,
    cube_where,
    idf_corpus,
    ids_where,
    list_where,
    pinned_where,
    scope_where,
    stale_keyed_where,
    tenant_where,
    texts_where,
    unkeyed_where,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E", bound=Engine)
S = TypeVar("S", bound="QdrantStore[Any]")

_PAGE = 1024
#: Pauses between attempts to open a store whose last attempt failed (a server down):
#: 1 s, doubling up to this cap. Calls in between fail at once.
_RECONNECT_FIRST_S = 1.0
_RECONNECT_MAX_S = 5.0


def _opened(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    @functools.wraps(method)
    def opened(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        if not self._open:
            self._connect()
        return method(self, *args, **kwargs)

    return opened


class QdrantStore(MemoryStore, Generic[E]):
    def __init__(self, engine: E, *, embedding_model: str, dim: int,
                 also_accept: Collection[str] = (), connect_later: bool = False) -> None:
        """``also_accept``: model ids of a store this embedder can serve (its
        ``same_space``). A store that cannot be opened is a StoreError, unless
        ``connect_later`` and it is unreachable: then calls try again, spaced, until one
        gets through (a proxy starting while its server restarts serves without memory
        meanwhile)."""
        self.engine = engine
        self.embedding_model = embedding_model
        self.dim = dim
        self.also_accept = also_accept
        self._lock = engine.write_lock
        self._open = False
        self._closed = False
        self._multivector = False
        self._connecting = threading.Lock()
        self._retry_at = 0.0
        self._pause = 0.0
        self._failure = ""
        try:
            self._connect()
        except Exception as exc:
            if connect_later and engine.unreachable(exc):
                log.warning("%s is unreachable (%s): memory is unavailable until it answers",
                            engine.describe, type(exc).__name__)
                return
            try:
                engine.close()  # Edge: the shard and its directory lock
            except Exception:
                log.debug("closing %s after a failed open failed too", engine.describe, exc_info=True)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open {engine.describe}: {exc}") from exc

    # -- opening -------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the store, once. While one caller tries, the others fail at once, and
        after a failed try the next waits out a pause: against a server that times out,
        every caller would otherwise wait out the timeout, one after another. A model or
        dimension mismatch found here is a StoreError, now or on the first call after
        the server came back."""
        if not self._connecting.acquire(blocking=False):
            raise StoreUnavailable(f"{self.engine.describe} is not open yet: another call is "
                                   "connecting to it")
        try:
            if self._open:
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise StoreUnavailable(f"{self.engine.describe} could not be opened "
                                       f"({self._failure}); next attempt in {wait:.1f} s")
            try:
                self._open_store()
            except Exception as exc:
                self._failure = type(exc).__name__
                self._pause = (min(_RECONNECT_MAX_S, self._pause * 2) if self._pause
                               else _RECONNECT_FIRST_S)
                self._retry_at = time.monotonic() + self._pause
                raise
            self._open, self._pause = True, 0.0
        finally:
            self._connecting.release()

    def _open_store(self) -> None:
        self.engine.open(self.dim, meta(self.embedding_model, self.dim))
        record = self.engine.metadata()
        check_meta(record, self.embedding_model, self.dim, self.engine.location, self.also_accept)
        self.engine.check_dense(self.dim)
        self._multivector = is_multivector(record or {})
        self._migrate()
        if not self._multivector:
            log.info("memory store %s predates sentence pieces: its items are searched by "
                     "their whole text only (export and import its cubes into a new store "
                     "to search by sentence)", self.engine.location)
        self.engine.ready()

    def _migrate(self) -> None:
        """Bring a store an older release wrote (or an older replica still writes to)
        up to this one's layout: indexes added since, and the fields they index."""
        indexed = self.engine.indexed()
        for field, kind in LATER_INDEXES:
            if field not in indexed:
                self.engine.create_index(field, kind)
        changed = False
        if PINNED_FIELD not in indexed:  # its pinned items get the flag, once
            pinned = [pid for pid, p in self._scan(EVERYTHING, ["pinned"]) if p.get("pinned")]
            for chunk in chunks(pinned):
                self.engine.set_payload(Where((HasIds(chunk),)), {PINNED_FIELD: 1})
            changed = bool(pinned)
        # Keys on current versions that lack them; none on superseded ones. Through
        # filters, so a version a replica supersedes meanwhile is not undone.
        unkeyed = scope_groups(self._scan(unkeyed_where(), ["tenant", "cube_id", "status"]))
        stale = [pid for pid, _ in self._scan(stale_keyed_where(), [SCOPE_FIELD])]
        for point_ids, fields in unkeyed:
            for chunk in chunks(point_ids):
                self.engine.set_payload(unkeyed_where(HasIds(chunk)), fields)
        for chunk in chunks(stale):
            self.engine.set_payload(stale_keyed_where(HasIds(chunk)), UNFLAG)
        if changed or unkeyed or stale:
            self.engine.flush()

    @property
    def multivector(self) -> bool:
        """Known once open; a first write asks before it reaches ``upsert``, so the
        question connects too (a store still unreachable says False, and that write
        fails in ``upsert`` anyway)."""
        if not self._open:
            try:
                self._connect()
            except Exception:
                return False
        return self._multivector

    @multivector.setter
    def multivector(self, value: bool) -> None:
        self._multivector = value

    # -- helpers -------------------------------------------------------------------------

    def _scan(self, where: Where, fields: Sequence[str] | bool = True, *,
              cubes: bool = False) -> Iterator[Record]:
        offset: str | None = None
        while True:
            records, offset = self.engine.scroll(where, fields=fields, limit=_PAGE, offset=offset,
                                                 cubes=cubes)
            yield from records
            if offset is None:
                return

    def _hits(self, found: list[Scored]) -> list[Hit]:
        return ranked([Hit(payload_item(payload), score) for payload, score in found])

    def _erase(self, tenant: str, where: Where) -> int:
        """Every version of every item with a point matching ``where``."""
        with self._lock:
            ids = sorted({p["id"] for _, p in self._scan(where, ["id"])})
            for chunk in chunks(ids):
                self.engine.delete(ids_where(tenant, chunk))
        return len(ids)

    # -- memory items ------------------------------------------------------------------

    @_opened
    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        per_item = check_pieces(items, vectors, pieces)
        points = [Point(item.point_id, item_payload(item, current=current),
                        dense_value(vector, item_pieces, self.dim, self._multivector), sparse_item(item))
                  for item, vector, item_pieces, current in zip(
                      items, vectors, per_item, batch_currents(items), strict=True)]
        if not points:
            return
        by_tenant: dict[str, set[str]] = {}
        for item in items:
            by_tenant.setdefault(item.tenant, set()).add(item.id)
        with self._lock:
            self.engine.upsert(points)
            for tenant, ids in by_tenant.items():
                for chunk in chunks(sorted(ids)):
                    flagged = self._scan(ids_where(tenant, chunk, current=True), ["id", "version"])
                    for stale in chunks(stale_currents(flagged)):
                        self.engine.set_payload(tenant_where(tenant, HasIds(stale)), UNFLAG)

    @_opened
    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        records, _ = self.engine.scroll(tenant_where(tenant, Match("id", memory_id), current=True),
                                        limit=1)
        return payload_item(records[0][1]) if records else None

    @_opened
    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        found = self._scan(tenant_where(tenant, Match("id", memory_id)))
        return sorted((payload_item(p) for _, p in found), key=lambda i: i.version)

    @_opened
    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        records, nxt = self.engine.scroll(list_where(tenant, user, cube_id, status), limit=limit,
                                          offset=decode_cursor(cursor) if cursor else None)
        return [payload_item(p) for _, p in records], (encode_cursor(nxt) if nxt is not None else None)

    @_opened
    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        pinned, _ = self.engine.scroll(pinned_where(tenant, cube_id), limit=limit)
        hot, _ = self.engine.scroll(active_where(tenant, cube_id), limit=limit,
                                    descending_by=ACCESS_FIELD)
        return unique_items(p for _, p in [*pinned, *hot])

    @_opened
    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        where = scope_where(scope)
        if where is None or limit < 1:
            return []
        return self._hits(self.engine.query_dense(
            dense_query(vector, self.dim, self._multivector), where, limit))

    @_opened
    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        where = scope_where(scope)
        indices, values = sparse_query(text)
        if where is None or limit < 1 or not indices:
            return []
        return self._hits(self.engine.query_sparse(indices, values, where, limit,
                                                   idf_corpus(scope.tenant)))

    @_opened
    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in chunks(sorted(set(keys))):
            found.update(p.get(TEXT_KEY_FIELD, "") for _, p in
                         self._scan(texts_where(tenant, cube_id, chunk), [TEXT_KEY_FIELD]))
        return found

    @_opened
    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        return self.engine.count(list_where(tenant, None, cube_id, None))

    @_opened
    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        times = Counter(memory_ids)
        with self._lock:
            for chunk in chunks(sorted(times)):
                found = list(self._scan(ids_where(tenant, chunk, current=True), ["id", "access_count"]))
                for point_ids, payload in touch_groups(found, times, at):
                    # The ids come from the tenant's own points (the scan above).
                    self.engine.set_payload(point_ids, payload)

    @_opened
    def purge_user(self, tenant: str, user: str) -> int:
        return self._erase(tenant, tenant_where(tenant, Match("user", user)))

    @_opened
    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        return self._erase(tenant, tenant_where(tenant, Match("cube_id", cube_id), current=True))

    # -- cubes ---------------------------------------------------------------------------

    @_opened
    def put_cube(self, cube: Cube) -> None:
        with self._lock:
            self.engine.upsert([Point(cube_point_id(cube.tenant, cube.id), cube_payload(cube))],
                               cubes=True)

    @_opened
    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        # The record's id is made from the tenant: another tenant's cube is unreachable.
        found = self.engine.retrieve([cube_point_id(tenant, cube_id)], cubes=True)
        return payload_cube(found[0][1]) if found else None

    @_opened
    def list_cubes(self, tenant: str) -> list[Cube]:
        return sorted((payload_cube(p) for _, p in self._scan(cube_where(tenant), cubes=True)),
                      key=lambda cube: cube.id)

    @_opened
    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        pid = cube_point_id(tenant, cube_id)
        with self._lock:
            found = self.engine.retrieve([pid], payload=False, cubes=True)
            if found:
                self.engine.delete([pid], cubes=True)
        return bool(found)

    # -- lifecycle -------------------------------------------------------------------------

    @_opened
    def probe(self) -> None:
        """A read and a write: a store can refuse writes alone (a disk gone read-only or
        full, a read-only replica). The write is a payload-only point among the cubes
        that no cube filter matches."""
        with self._lock:
            self.engine.retrieve([PROBE_ID], payload=False)
            self.engine.upsert([Point(PROBE_ID, {"probe": 1})], cubes=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.engine.close()
