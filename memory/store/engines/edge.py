"""The Qdrant Edge engine (``qdrant-edge-py``): the Qdrant engine in-process, one shard
under a directory.

The shard holds three kinds of point, told apart by their payload:

- memory versions (top-level ``tenant``, ``id``, ``current``, ...): the only points
  with a dense or sparse vector, and the only ones any memory filter can match,
  since every memory filter requires ``tenant`` (or a scope key, which holds it);
- cube records (``{"cube": {...}}``), payload-only;
- one metadata record (``{"memcube_store": {...}}``, id ``META_ID``) naming the
  embedding model and dimension the shard was built for.

Keeping cubes in the shard rather than a second one gives one write-ahead log, one
flush and one directory lock; the shard's own WAL lock already refuses a second
process opening the same directory. So the cubes are the memories' points here.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Collection, Sequence
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
    Query,
    QueryRequest,
    ScrollRequest,
    SearchParams,
    SparseVector,
    UpdateOperation,
)
from qdrant_edge import Point as EdgePoint

from memory.fsutil import fsync_dir
from memory.models import stable_id
from memory.store.base import StoreError
from memory.store.engines.base import Point, Record, Scored, Target
from memory.store.layout import CUBE_INDEXES, DENSE, MEMORY_INDEXES, META_KEY, SPARSE, IndexKind
from memory.store.where import Cond, HasIds, Match, MatchIn, MatchNot, Missing, Where

log = logging.getLogger(__name__)

META_ID = stable_id("memcube-store-meta")

_INDEX_PARAMS: dict[IndexKind, Any] = {
    "tenant": KeywordIndexParams(is_tenant=True),
    "keyword": KeywordIndexParams(),
    "lookup": IntegerIndexParams(lookup=True, range=False),
    "range": IntegerIndexParams(lookup=False, range=True),
}


def _cond(x: Cond) -> Any:
    if isinstance(x, Match):
        return FieldCondition(x.key, match=MatchValue(x.value))
    if isinstance(x, MatchIn):
        return FieldCondition(x.key, match=MatchAny(list(x.values)))
    if isinstance(x, Missing):
        return IsEmptyCondition(x.key)
    if isinstance(x, MatchNot):
        return FieldCondition(x.key, match=MatchExcept(list(x.values)))
    assert isinstance(x, HasIds)
    return HasIdCondition(set(x.ids))


def _filter(where: Where) -> Filter:
    return Filter(must=[_cond(x) for x in where.must])


def _point(p: Point) -> EdgePoint:
    vectors: dict[str, Any] = {}
    if p.dense is not None:
        vectors[DENSE] = p.dense
    if p.sparse is not None:
        vectors[SPARSE] = SparseVector(*p.sparse)
    return EdgePoint(p.id, vectors, p.payload)


class EdgeEngine:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.describe = f"Qdrant Edge store at {path}"
        self.location = str(path)
        self.write_lock = threading.Lock()
        self._shard: EdgeShard | None = None

    @property
    def shard(self) -> EdgeShard:
        if self._shard is None:
            raise StoreError(f"{self.describe} is not open")
        return self._shard

    # -- lifecycle -----------------------------------------------------------------

    def open(self, dim: int, record: dict[str, Any]) -> None:
        if not self.path.exists() or not any(self.path.iterdir()):
            self._create(dim, record)
        try:
            self._shard = EdgeShard.load(str(self.path))
        except Exception as exc:  # the binding raises bare Exception
            raise StoreError(f"cannot open {self.describe}: {exc}") from exc

    def _create(self, dim: int, record: dict[str, Any]) -> None:
        """Build a new shard beside ``path`` and rename it into place once its indexes
        and metadata record are flushed: a kill during creation leaves nothing, or a
        leftover the next creation removes, never a store that every later start must
        refuse for its missing metadata."""
        building = self.path.with_name(f".{self.path.name}.creating")
        shutil.rmtree(building, ignore_errors=True)
        try:
            shard = EdgeShard.create(str(building), EdgeConfig(
                vectors={DENSE: EdgeVectorParams(
                    size=dim, distance=Distance.Cosine,
                    multivector_config=MultiVectorConfig(MultiVectorComparator.MaxSim))},
                sparse_vectors={SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)}))
        except Exception as exc:  # the binding raises bare Exception
            raise StoreError(f"cannot create {self.describe}: {exc}") from exc
        try:
            for field, kind in (*MEMORY_INDEXES, *CUBE_INDEXES):
                shard.update(UpdateOperation.create_field_index(field, _INDEX_PARAMS[kind]))
            shard.update(UpdateOperation.upsert_points([EdgePoint(META_ID, {}, {META_KEY: record})]))
            shard.flush()
        finally:
            shard.close()
        if self.path.exists():
            self.path.rmdir()  # empty: an existing store is never replaced
        os.rename(building, self.path)
        fsync_dir(self.path.parent)

    def metadata(self) -> dict[str, Any] | None:
        found = self.shard.retrieve([META_ID], with_payload=True, with_vector=False)
        record = (found[0].payload or {}).get(META_KEY) if found else None
        return record if isinstance(record, dict) else None

    def indexed(self) -> Collection[str]:
        return set(self.shard.info().payload_schema)

    def create_index(self, field: str, kind: IndexKind) -> None:
        self.shard.update(UpdateOperation.create_field_index(field, _INDEX_PARAMS[kind]))

    def check_dense(self, dim: int) -> None:
        """The binding does not report the shard's vector parameters: the metadata
        record is all there is to go by."""

    def ready(self) -> None:
        """Build the search index of what was written since the last one, before serving.

        Edge runs no optimizer of its own, and ``optimize`` holds the GIL throughout
        (5-8 s per 10k new points with their sentence vectors, 133 s for 100k on 2
        cores), so it cannot run beside requests. At open
        nothing is served yet: each restart indexes the tail written since the last
        one; until then that tail is searched by a full scan (3-4 ms at 10k points).
        Edge itself decides whether anything is due (a few thousand points at least)."""
        info = self.shard.info()
        # Each memory has a dense and a sparse vector; the sparse are indexed as written.
        unindexed = 2 * info.points_count - info.indexed_vectors_count
        if unindexed >= 1000:
            log.info("memory store %s: indexing up to %d new points before serving "
                     "(about 6 s per 10k on 2 cores)", self.path, unindexed)
        started = time.perf_counter()
        if self.optimize():
            log.info("memory store %s: search index built in %.1f s", self.path,
                     time.perf_counter() - started)

    def optimize(self) -> bool:
        return bool(self.shard.optimize())

    def flush(self) -> None:
        self.shard.flush()

    def close(self) -> None:
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.flush()
            shard.close()

    def unreachable(self, exc: BaseException) -> bool:
        return False  # in-process: a failure is never the network's

    # -- points ----------------------------------------------------------------------

    def scroll(self, where: Where, *, fields: Sequence[str] | bool = True, limit: int,
               offset: str | None = None, descending_by: str | None = None,
               cubes: bool = False) -> tuple[list[Record], str | None]:
        records, nxt = self.shard.scroll(ScrollRequest(
            offset=offset, limit=limit, filter=_filter(where),
            with_payload=fields if isinstance(fields, bool) else list(fields), with_vector=False,
            order_by=OrderBy(descending_by, Direction.Desc) if descending_by else None))
        return [(str(r.id), r.payload or {}) for r in records], None if nxt is None else str(nxt)

    def retrieve(self, ids: Sequence[str], *, payload: bool = True,
                 cubes: bool = False) -> list[Record]:
        found = self.shard.retrieve(list(ids), with_payload=payload, with_vector=False)
        return [(str(r.id), r.payload or {}) for r in found]

    def upsert(self, points: Sequence[Point], *, cubes: bool = False) -> None:
        self.shard.update(UpdateOperation.upsert_points([_point(p) for p in points]))

    def set_payload(self, target: Target, payload: dict[str, Any]) -> None:
        self.shard.update(UpdateOperation.set_payload_by_filter(_filter(target), payload)
                          if isinstance(target, Where) else
                          UpdateOperation.set_payload(list(target), payload))

    def delete(self, target: Target, *, cubes: bool = False) -> None:
        self.shard.update(UpdateOperation.delete_points_by_filter(_filter(target))
                          if isinstance(target, Where) else
                          UpdateOperation.delete_points(list(target)))

    def count(self, where: Where) -> int:
        return int(self.shard.count(CountRequest(exact=True, filter=_filter(where))))

    def query_dense(self, vector: list[float] | list[list[float]], where: Where,
                    limit: int) -> list[Scored]:
        return self._query(QueryRequest(
            limit=limit, query=Query.Nearest(vector, using=DENSE), filter=_filter(where),
            with_payload=True, with_vector=False))

    def query_sparse(self, indices: list[int], values: list[float], where: Where, limit: int,
                     idf_corpus: Where) -> list[Scored]:
        return self._query(QueryRequest(
            limit=limit, query=Query.Nearest(SparseVector(indices, values), using=SPARSE),
            filter=_filter(where), with_payload=True, with_vector=False,
            params=SearchParams(idf=IdfParams(corpus=_filter(idf_corpus)))))

    def _query(self, request: QueryRequest) -> list[Scored]:
        return [(p.payload or {}, float(p.score)) for p in self.shard.query(request)]
