"""The embedded store: Qdrant Edge (the Qdrant engine in-process) under a directory.

One shard holds three kinds of point, told apart by their payload:

- memory versions (top-level ``tenant``, ``id``, ``current``, ...): the only points
  with a dense or sparse vector, and the only ones any memory filter can match,
  since every memory filter requires ``tenant`` (or a scope key, which holds it);
- cube records (``{"cube": {...}}``), payload-only;
- one metadata record (``{"memcube_store": {...}}``) naming the embedding model and
  dimension the shard was built for.

Keeping cubes in the shard rather than a second one gives one write-ahead log, one
flush and one directory lock; the shard's own WAL lock already refuses a second
process opening the same directory. Writes take a lock so that a multi-step write
(upsert, then settle the current flags) is not interleaved with another.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from qdrant_edge import (
    CountRequest,
    Direction,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeSparseVectorParams,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    HasIdCondition,
    IdfParams,
    IntegerIndexParams,
    IsEmptyCondition,
    KeywordIndexParams,
    MatchAny,
    MatchExcept,
    MatchValue,
    Modifier,
    MultiVectorComparator,
    MultiVectorConfig,
    OrderBy,
    Point,
    Query,
    QueryRequest,
    ScrollRequest,
    SearchParams,
    SparseVector,
    UpdateOperation,
)

from memory.fsutil import fsync_dir
from memory.models import Cube, MemoryItem, MemoryStatus, stable_id
from memory.store import _common as c
from memory.store.base import Hit, MemoryStore, Scope, StoreError

log = logging.getLogger(__name__)

_META_ID = stable_id("memcube-store-meta")
# A payload-only point the probe rewrites: no memory or cube filter can match it.
_PAGE = 1024


def _filter(where: c.Where) -> Filter:
    def cond(x: c.Cond) -> Any:
        if isinstance(x, c.Match):
            return FieldCondition(x.key, match=MatchValue(x.value))
        if isinstance(x, c.MatchIn):
            return FieldCondition(x.key, match=MatchAny(list(x.values)))
        if isinstance(x, c.Missing):
            return IsEmptyCondition(x.key)
        if isinstance(x, c.MatchNot):
            return FieldCondition(x.key, match=MatchExcept(list(x.values)))
        return HasIdCondition(set(x.ids))

    return Filter(must=[cond(x) for x in where.must])


def _index_operations() -> list[UpdateOperation]:
    ops = [UpdateOperation.create_field_index(c.TENANT_FIELD, KeywordIndexParams(is_tenant=True)),
           UpdateOperation.create_field_index(
               c.CURRENT_FIELD, IntegerIndexParams(lookup=True, range=False)),
           UpdateOperation.create_field_index(c.CUBE_TENANT_FIELD, KeywordIndexParams()),
           UpdateOperation.create_field_index(
               c.ACCESS_FIELD, IntegerIndexParams(lookup=False, range=True)),
           UpdateOperation.create_field_index(
               c.PINNED_FIELD, IntegerIndexParams(lookup=True, range=False))]
    return ops + [UpdateOperation.create_field_index(k, KeywordIndexParams())
                  for k in c.KEYWORD_INDEXES]


class EdgeStore(MemoryStore):
    def __init__(self, path: Path, *, embedding_model: str, dim: int,
                 also_accept: Collection[str] = ()) -> None:
        """``also_accept``: model ids of a store this embedder can serve (its
        ``same_space``)."""
        self.path = Path(path)
        self.embedding_model = embedding_model
        self.dim = dim
        self._lock = threading.Lock()
        self._closed = False
        if not self.path.exists() or not any(self.path.iterdir()):
            self._create(embedding_model, dim)
        try:
            self._shard = EdgeShard.load(str(self.path))
        except Exception as exc:  # the binding raises bare Exception
            raise StoreError(f"cannot open Qdrant Edge store at {self.path}: {exc}") from exc
        schema = self._shard.info().payload_schema
        if c.TEXT_KEY_FIELD not in schema:  # a store from before it
            self._shard.update(UpdateOperation.create_field_index(c.TEXT_KEY_FIELD, KeywordIndexParams()))
        if c.ACCESS_FIELD not in schema:  # likewise
            self._shard.update(UpdateOperation.create_field_index(
                c.ACCESS_FIELD, IntegerIndexParams(lookup=False, range=True)))
        if c.PINNED_FIELD not in schema:  # likewise; its items get the field once
            self._shard.update(UpdateOperation.create_field_index(
                c.PINNED_FIELD, IntegerIndexParams(lookup=True, range=False)))
            pinned = [pid for pid, p in self._scroll(c.Where(()), ["pinned"]) if p.get("pinned")]
            for chunk in c.chunks(pinned):
                self._shard.update(UpdateOperation.set_payload_by_filter(
                    _filter(c.Where((c.HasIds(chunk),))), {c.PINNED_FIELD: 1}))
            self._shard.flush()
        found = self._shard.retrieve([_META_ID], with_payload=True, with_vector=False)
        record = (found[0].payload or {}).get(c.META_KEY) if found else None
        try:
            c.check_meta(record, embedding_model, dim, str(self.path), also_accept)
        except StoreError:
            self._shard.close()
            raise
        self.multivector = c.is_multivector(record or {})
        for field in c.SCOPE_FIELDS:  # current items without them get them
            if field not in schema:
                self._shard.update(UpdateOperation.create_field_index(field, KeywordIndexParams()))
        self._settle_keys()
        if not self.multivector:
            log.info("memory store %s predates sentence pieces: its items are searched by "
                     "their whole text only (export and import its cubes into a new store "
                     "to search by sentence)", self.path)
        self._index_on_open()

    def _create(self, embedding_model: str, dim: int) -> None:
        """Build a new shard beside ``path`` and rename it into place once its indexes
        and metadata record are flushed: a kill during creation leaves nothing, or a
        leftover the next creation removes, never a store that every later start must
        refuse for its missing metadata."""
        building = self.path.with_name(f".{self.path.name}.creating")
        shutil.rmtree(building, ignore_errors=True)
        try:
            shard = EdgeShard.create(str(building), EdgeConfig(
                vectors={c.DENSE: EdgeVectorParams(
                    size=dim, distance=Distance.Cosine,
                    multivector_config=MultiVectorConfig(MultiVectorComparator.MaxSim))},
                sparse_vectors={c.SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)}))
        except Exception as exc:  # the binding raises bare Exception
            raise StoreError(f"cannot create Qdrant Edge store at {self.path}: {exc}") from exc
        try:
            for op in _index_operations():
                shard.update(op)
            shard.update(UpdateOperation.upsert_points(
                [Point(_META_ID, {}, {c.META_KEY: c.meta(embedding_model, dim)})]))
            shard.flush()
        finally:
            shard.close()
        if self.path.exists():
            self.path.rmdir()  # empty: an existing store is never replaced
        os.rename(building, self.path)
        fsync_dir(self.path.parent)

    def _settle_keys(self) -> None:
        """Keys on current versions that lack them; none on superseded ones."""
        unkeyed = c.scope_groups(self._scroll(c.unkeyed_where(), ["tenant", "cube_id", "status"]))
        stale = [pid for pid, _ in self._scroll(c.stale_keyed_where(), [c.SCOPE_FIELD])]
        for point_ids, fields in unkeyed:
            for chunk in c.chunks(point_ids):
                self._shard.update(UpdateOperation.set_payload_by_filter(
                    _filter(c.unkeyed_where(c.HasIds(chunk))), fields))
        for chunk in c.chunks(stale):
            self._shard.update(UpdateOperation.set_payload_by_filter(
                _filter(c.Where((c.Match(c.CURRENT_FIELD, 0), c.HasIds(chunk)))), c.UNFLAG))
        if unkeyed or stale:
            self._shard.flush()

    def _index_on_open(self) -> None:
        """Build the search index of what was written since the last one, before serving.

        Edge runs no optimizer of its own, and ``optimize`` holds the GIL throughout
        (5-8 s per 10k new points with their sentence vectors, 133 s for 100k on 2
        cores), so it cannot run beside requests. At open
        nothing is served yet: each restart indexes the tail written since the last
        one; until then that tail is searched by a full scan (3-4 ms at 10k points).
        Edge itself decides whether anything is due (a few thousand points at least)."""
        info = self._shard.info()
        # Each memory has a dense and a sparse vector; the sparse are indexed as written.
        unindexed = 2 * info.points_count - info.indexed_vectors_count
        if unindexed >= 1000:
            log.info("memory store %s: indexing up to %d new points before serving "
                     "(about 6 s per 10k on 2 cores)", self.path, unindexed)
        started = time.perf_counter()
        if self.optimize():
            log.info("memory store %s: search index built in %.1f s", self.path,
                     time.perf_counter() - started)

    # -- helpers -------------------------------------------------------------------

    def _scroll(self, where: c.Where,
                fields: list[str] | bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        offset: Any = None
        while True:
            records, offset = self._shard.scroll(ScrollRequest(
                offset=offset, limit=_PAGE, filter=_filter(where), with_payload=fields, with_vector=False))
            for r in records:
                yield str(r.id), r.payload or {}
            if offset is None:
                return

    def _unflag(self, tenant: str, point_ids: Sequence[str]) -> None:
        for chunk in c.chunks(point_ids):
            self._shard.update(UpdateOperation.set_payload_by_filter(
                _filter(c.tenant_where(tenant, c.HasIds(chunk))), c.UNFLAG))

    def _erase(self, tenant: str, memory_ids: Sequence[str]) -> None:
        for chunk in c.chunks(memory_ids):
            self._shard.update(UpdateOperation.delete_points_by_filter(
                _filter(c.tenant_where(tenant, c.MatchIn("id", chunk)))))

    def _hits(self, request: QueryRequest) -> list[Hit]:
        return c.ranked([Hit(c.payload_item(p.payload or {}), float(p.score))
                         for p in self._shard.query(request)])

    # -- memory items ------------------------------------------------------------

    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        per_item = c.check_pieces(items, vectors, pieces)
        points = []
        for item, vector, item_pieces, current in zip(
                items, vectors, per_item, c.batch_currents(items), strict=True):
            indices, values = c.sparse_item(item)
            points.append(Point(c.point_id(item),
                                {c.DENSE: c.dense_value(vector, item_pieces, self.dim, self.multivector),
                                 c.SPARSE: SparseVector(indices, values)},
                                c.item_payload(item, current=current)))
        if not points:
            return
        by_tenant: dict[str, list[str]] = {}
        for item in items:
            by_tenant.setdefault(item.tenant, []).append(item.id)
        with self._lock:
            self._shard.update(UpdateOperation.upsert_points(points))
            for tenant, ids in by_tenant.items():
                for chunk in c.chunks(sorted(set(ids))):
                    flagged = self._scroll(c.tenant_where(tenant, c.MatchIn("id", chunk), current=True),
                                           ["id", "version"])
                    self._unflag(tenant, c.stale_currents(flagged))

    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        records, _ = self._shard.scroll(ScrollRequest(
            limit=1, filter=_filter(c.tenant_where(tenant, c.Match("id", memory_id), current=True)),
            with_payload=True, with_vector=False))
        return c.payload_item(records[0].payload or {}) if records else None

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        found = [c.payload_item(p) for _, p in self._scroll(c.tenant_where(tenant, c.Match("id", memory_id)))]
        return sorted(found, key=lambda i: i.version)

    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        records, nxt = self._shard.scroll(ScrollRequest(
            offset=c.decode_cursor(cursor) if cursor else None, limit=limit,
            filter=_filter(c.list_where(tenant, user, cube_id, status)),
            with_payload=True, with_vector=False))
        page = [c.payload_item(r.payload or {}) for r in records]
        return page, (c.encode_cursor(str(nxt)) if nxt is not None else None)

    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        pinned, _ = self._shard.scroll(ScrollRequest(
            limit=limit, filter=_filter(c.pinned_where(tenant, cube_id)), with_payload=True,
            with_vector=False))
        hot, _ = self._shard.scroll(ScrollRequest(
            limit=limit, filter=_filter(c.active_where(tenant, cube_id)), with_payload=True,
            with_vector=False, order_by=OrderBy(c.ACCESS_FIELD, Direction.Desc)))
        return c.unique_items([r.payload or {} for r in [*pinned, *hot]])

    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        where = c.scope_where(scope)
        if where is None or limit < 1:
            return []
        return self._hits(QueryRequest(
            limit=limit,
            query=Query.Nearest(c.dense_query(vector, self.dim, self.multivector), using=c.DENSE),
            filter=_filter(where), with_payload=True, with_vector=False))

    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        where = c.scope_where(scope)
        indices, values = c.sparse_query(text)
        if where is None or limit < 1 or not indices:
            return []
        return self._hits(QueryRequest(
            limit=limit, query=Query.Nearest(SparseVector(indices, values), using=c.SPARSE),
            filter=_filter(where), with_payload=True, with_vector=False,
            params=SearchParams(idf=IdfParams(corpus=_filter(c.idf_corpus(scope.tenant))))))

    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in c.chunks(sorted(set(keys))):
            found.update(p.get(c.TEXT_KEY_FIELD, "") for _, p in
                         self._scroll(c.texts_where(tenant, cube_id, chunk), [c.TEXT_KEY_FIELD]))
        return found

    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        where = c.list_where(tenant, None, cube_id, None)
        return int(self._shard.count(CountRequest(exact=True, filter=_filter(where))))

    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        times = Counter(memory_ids)
        with self._lock:
            for chunk in c.chunks(sorted(times)):
                where = c.tenant_where(tenant, c.MatchIn("id", chunk), current=True)
                found = list(self._scroll(where, ["id", "access_count"]))
                for point_ids, payload in c.touch_groups(found, times, at):
                    self._shard.update(UpdateOperation.set_payload(list(point_ids), payload))

    def purge_user(self, tenant: str, user: str) -> int:
        with self._lock:
            ids = sorted({p["id"] for _, p in self._scroll(c.tenant_where(tenant, c.Match("user", user)),
                                                          ["id"])})
            self._erase(tenant, ids)
        return len(ids)

    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        with self._lock:
            where = c.tenant_where(tenant, c.Match("cube_id", cube_id), current=True)
            ids = sorted({p["id"] for _, p in self._scroll(where, ["id"])})
            self._erase(tenant, ids)
        return len(ids)

    # -- cubes ---------------------------------------------------------------------

    def put_cube(self, cube: Cube) -> None:
        with self._lock:
            self._shard.update(UpdateOperation.upsert_points(
                [Point(c.cube_point_id(cube.tenant, cube.id), {}, c.cube_payload(cube))]))

    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        # The record's id is made from the tenant: another tenant's cube is unreachable.
        found = self._shard.retrieve([c.cube_point_id(tenant, cube_id)], with_payload=True, with_vector=False)
        return c.payload_cube(found[0].payload or {}) if found else None

    def list_cubes(self, tenant: str) -> list[Cube]:
        return sorted((c.payload_cube(p) for _, p in self._scroll(c.cube_where(tenant))),
                      key=lambda cube: cube.id)

    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        point_id = c.cube_point_id(tenant, cube_id)
        with self._lock:
            found = self._shard.retrieve([point_id], with_payload=False, with_vector=False)
            if found:
                self._shard.update(UpdateOperation.delete_points([point_id]))
        return bool(found)

    # -- lifecycle -------------------------------------------------------------------

    def probe(self) -> None:
        """A read and a write through the write-ahead log: a shard whose disk went
        read-only still answers reads."""
        with self._lock:
            self._shard.retrieve([_META_ID], with_payload=False, with_vector=False)
            self._shard.update(UpdateOperation.upsert_points([Point(c.PROBE_ID, {}, {"probe": 1})]))

    def optimize(self) -> bool:
        """Build the HNSW index and drop deleted points (done at every open). Edge runs
        no optimizer by itself: until this runs, dense search is a full scan (about
        3-4 ms at 10k items of one tenant, about 1.5 ms after). qdrant-edge-py 0.9 holds
        the GIL throughout (5-8 s at 10k items with their sentence vectors), stalling
        the whole process: never call it from a request path."""
        with self._lock:
            return bool(self._shard.optimize())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shard.flush()
            self._shard.close()
