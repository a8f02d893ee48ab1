"""The Qdrant server engine (``qdrant-client``): a Qdrant server or cluster.

Memory versions live in one collection (named vectors ``dense`` and ``bm25``), cubes
in a small second one (``<collection>_cubes``, payload only), so every proxy replica
sharing the server sees the same cubes. The embedding model and dimension are kept
in the collection's metadata, set when the collection is created.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from typing import Any

import httpx
from qdrant_client import QdrantClient
from qdrant_client import models as m
from qdrant_client.http.exceptions import ResponseHandlingException

from memory.store.base import StoreError
from memory.store.engines.base import Point, Record, Scored, Target
from memory.store.layout import CUBE_INDEXES, DENSE, MEMORY_INDEXES, META_KEY, SPARSE, IndexKind
from memory.store.where import Cond, HasIds, Match, MatchIn, MatchNot, Missing, Where

log = logging.getLogger(__name__)

_SCHEMAS: dict[IndexKind, m.PayloadSchemaType | m.KeywordIndexParams] = {
    "tenant": m.KeywordIndexParams(type=m.KeywordIndexType.KEYWORD, is_tenant=True),
    "keyword": m.PayloadSchemaType.KEYWORD,
    "lookup": m.PayloadSchemaType.INTEGER,
    "range": m.PayloadSchemaType.INTEGER,
}


def _cond(x: Cond) -> m.Condition:
    if isinstance(x, Match):
        return m.FieldCondition(key=x.key, match=m.MatchValue(value=x.value))
    if isinstance(x, MatchIn):
        return m.FieldCondition(key=x.key, match=m.MatchAny(any=list(x.values)))
    if isinstance(x, Missing):
        return m.IsEmptyCondition(is_empty=m.PayloadField(key=x.key))
    if isinstance(x, MatchNot):
        return m.FieldCondition(key=x.key, match=m.MatchExcept(**{"except": list(x.values)}))
    assert isinstance(x, HasIds)
    return m.HasIdCondition(has_id=list(x.ids))


def _filter(where: Where) -> m.Filter:
    return m.Filter(must=[_cond(x) for x in where.must])


def _selector(target: Target) -> m.Filter | m.PointIdsList:
    return _filter(target) if isinstance(target, Where) else m.PointIdsList(points=list(target))


def _point(p: Point) -> m.PointStruct:
    vector: dict[str, Any] = {}
    if p.dense is not None:
        vector[DENSE] = p.dense
    if p.sparse is not None:
        vector[SPARSE] = m.SparseVector(indices=p.sparse[0], values=p.sparse[1])
    return m.PointStruct(id=p.id, vector=vector, payload=p.payload)


class ServerEngine:
    def __init__(self, client: QdrantClient, collection: str) -> None:
        self.client = client
        self.collection = collection
        self.cubes_collection = f"{collection}_cubes"
        self.describe = f"Qdrant collection {collection!r}"
        self.location = f"{collection!r} ({self.server()})"
        self.write_lock = nullcontext()
        #: Whether ``close`` closes the client too (a store made ``from_url`` owns it).
        self.owns_client = False

    def server(self) -> str:
        options = self.client.init_options
        for key in ("url", "host", "path", "location"):
            if options.get(key):
                return str(options[key])
        return "qdrant"

    def _name(self, cubes: bool) -> str:
        return self.cubes_collection if cubes else self.collection

    # -- lifecycle -----------------------------------------------------------------

    def open(self, dim: int, record: dict[str, Any]) -> None:
        if self.client.collection_exists(self.collection):
            return
        self._create(self.collection, dict(
            vectors_config={DENSE: m.VectorParams(
                size=dim, distance=m.Distance.COSINE,
                multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM))},
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
            metadata={META_KEY: record}))
        for field, kind in MEMORY_INDEXES:
            self.create_index(field, kind)

    def _create(self, name: str, params: dict[str, Any]) -> None:
        try:
            self.client.create_collection(name, **params)
        except Exception:
            # Another replica may have created it between our check and our create.
            if not self.client.collection_exists(name):
                raise
            log.info("collection %s was created concurrently", name)

    def metadata(self) -> dict[str, Any] | None:
        record = (self.client.get_collection(self.collection).config.metadata or {}).get(META_KEY)
        return record if isinstance(record, dict) else None

    def indexed(self) -> Collection[str]:
        return set(self.client.get_collection(self.collection).payload_schema or {})

    def create_index(self, field: str, kind: IndexKind, *, cubes: bool = False) -> None:
        self.client.create_payload_index(self._name(cubes), field, field_schema=_SCHEMAS[kind])

    def check_dense(self, dim: int) -> None:
        dense = self.client.get_collection(self.collection).config.params.vectors
        size = dense[DENSE].size if isinstance(dense, dict) and DENSE in dense else None
        if size != dim:
            raise StoreError(f"collection {self.location} has no {dim}-dim vector {DENSE!r} "
                             f"(found {dense!r}); its metadata says otherwise: it was altered by hand")

    def ready(self) -> None:
        if not self.client.collection_exists(self.cubes_collection):
            self._create(self.cubes_collection, dict(vectors_config={}))
            for field, kind in CUBE_INDEXES:
                self.create_index(field, kind, cubes=True)

    def optimize(self) -> bool:
        return False  # the server runs its own optimizer

    def flush(self) -> None:
        """Writes wait for the server's acknowledgement: nothing is left to flush."""

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def unreachable(self, exc: BaseException) -> bool:
        return isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError,
                                TimeoutError))

    # -- points ----------------------------------------------------------------------

    def scroll(self, where: Where, *, fields: Sequence[str] | bool = True, limit: int,
               offset: str | None = None, descending_by: str | None = None,
               cubes: bool = False) -> tuple[list[Record], str | None]:
        records, nxt = self.client.scroll(
            self._name(cubes), scroll_filter=_filter(where), limit=limit, offset=offset,
            with_payload=fields if isinstance(fields, bool) else list(fields), with_vectors=False,
            order_by=m.OrderBy(key=descending_by, direction=m.Direction.DESC) if descending_by else None)
        return [(str(r.id), r.payload or {}) for r in records], None if nxt is None else str(nxt)

    def retrieve(self, ids: Sequence[str], *, payload: bool = True,
                 cubes: bool = False) -> list[Record]:
        found = self.client.retrieve(self._name(cubes), list(ids), with_payload=payload,
                                     with_vectors=False)
        return [(str(r.id), r.payload or {}) for r in found]

    def upsert(self, points: Sequence[Point], *, cubes: bool = False) -> None:
        self.client.upsert(self._name(cubes), [_point(p) for p in points], wait=True)

    def set_payload(self, target: Target, payload: dict[str, Any]) -> None:
        # Ids come from the store's own scroll of the tenant's points.
        self.client.set_payload(self.collection, payload, points=_selector(target))

    def delete(self, target: Target, *, cubes: bool = False) -> None:
        self.client.delete(self._name(cubes), points_selector=_selector(target), wait=True)

    def count(self, where: Where) -> int:
        return int(self.client.count(self.collection, count_filter=_filter(where), exact=True).count)

    def query_dense(self, vector: list[float] | list[list[float]], where: Where,
                    limit: int) -> list[Scored]:
        return self._query(vector, DENSE, where, limit, None)

    def query_sparse(self, indices: list[int], values: list[float], where: Where, limit: int,
                     idf_corpus: Where) -> list[Scored]:
        params = m.SearchParams(idf=m.IdfCorpusParams(corpus=_filter(idf_corpus)))
        return self._query(m.SparseVector(indices=indices, values=values), SPARSE, where, limit, params)

    def _query(self, query: Any, using: str, where: Where, limit: int,
               params: m.SearchParams | None) -> list[Scored]:
        points = self.client.query_points(
            self.collection, query=query, using=using, query_filter=_filter(where),
            search_params=params, limit=limit, with_payload=True, with_vectors=False).points
        return [(p.payload or {}, float(p.score)) for p in points]
