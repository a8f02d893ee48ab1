"""The scale-out store: a Qdrant server or cluster, through ``qdrant-client``.

Memory versions live in one collection (named vectors ``dense`` and ``bm25``), cubes
in a small second one (``<collection>_cubes``, payload only), so every proxy replica
sharing the server sees the same cubes. The embedding model and dimension are kept
in the collection's metadata, set when the collection is created.

Replicas write without a shared lock, so an upsert settles the current flags after
writing (the highest stored version of an item wins, see ``_common.stale_currents``);
``touch`` is read-modify-write, and concurrent touches of one item may count once.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx
from qdrant_client import QdrantClient
from qdrant_client import models as m
from qdrant_client.http.exceptions import ResponseHandlingException

from memory.models import Cube, MemoryItem, MemoryStatus
from memory.store import _common as c
from memory.store.base import Hit, MemoryStore, Scope, StoreError

log = logging.getLogger(__name__)

_PAGE = 1024
P = ParamSpec("P")
T = TypeVar("T")


def _unreachable(exc: BaseException) -> bool:
    """The server did not answer at all (refused, reset, timed out), as opposed to
    answering that something is wrong."""
    return isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError,
                            TimeoutError))


def _needs_open(method: Callable[Concatenate[ServerStore, P], T]
                ) -> Callable[Concatenate[ServerStore, P], T]:
    @functools.wraps(method)
    def opened(self: ServerStore, *args: P.args, **kwargs: P.kwargs) -> T:
        if not self._open:
            self._connect()
        return method(self, *args, **kwargs)

    return opened


def _filter(where: c.Where) -> m.Filter:
    def cond(x: c.Cond) -> m.Condition:
        if isinstance(x, c.Match):
            return m.FieldCondition(key=x.key, match=m.MatchValue(value=x.value))
        if isinstance(x, c.MatchIn):
            return m.FieldCondition(key=x.key, match=m.MatchAny(any=list(x.values)))
        if isinstance(x, c.Missing):
            return m.IsEmptyCondition(is_empty=m.PayloadField(key=x.key))
        if isinstance(x, c.MatchNot):
            return m.FieldCondition(key=x.key, match=m.MatchExcept(**{"except": list(x.values)}))
        return m.HasIdCondition(has_id=list(x.ids))

    return m.Filter(must=[cond(x) for x in where.must])


class ServerStore(MemoryStore):
    def __init__(self, client: QdrantClient, *, collection: str = "memcube_memories",
                 embedding_model: str, dim: int, also_accept: Collection[str] = (),
                 connect_later: bool = False) -> None:
        """``also_accept``: model ids of a store this embedder can serve (its
        ``same_space``). An unreachable server is a StoreError, unless
        ``connect_later``: then every call tries again until one gets through (a
        proxy starting while its server restarts serves without memory meanwhile)."""
        self.client = client
        self.also_accept = also_accept
        self._owns_client = False
        self.collection = collection
        self.cubes_collection = f"{collection}_cubes"
        self.embedding_model = embedding_model
        self.dim = dim
        self._open = False
        self._open_lock = threading.Lock()
        self._multivector = False
        try:
            self._connect()
        except StoreError:
            raise
        except Exception as exc:
            if not (connect_later and _unreachable(exc)):
                raise StoreError(f"cannot open Qdrant collection {collection!r}: {exc}") from exc
            log.warning("Qdrant at %s is unreachable (%s): memory is unavailable until it "
                        "answers", self._location(), type(exc).__name__)

    def _connect(self) -> None:
        """Check (or create) the collections, once. A model or dimension mismatch found
        here is a StoreError, now or on the first call after the server came back."""
        with self._open_lock:
            if not self._open:
                self._ensure_collections()
                self._open = True

    @property
    def multivector(self) -> bool:
        """Known once connected; a first write asks before it reaches ``upsert``, so the
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

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None, *, collection: str = "memcube_memories",
                 embedding_model: str, dim: int, also_accept: Collection[str] = (), timeout: int = 10,
                 connect_later: bool = False, **client_options: Any) -> ServerStore:
        """A store on its own client (closed with the store); ``client_options`` go to
        ``QdrantClient`` (e.g. ``prefer_grpc=True``)."""
        client = QdrantClient(url=url, api_key=api_key, timeout=timeout, **client_options)
        try:
            store = cls(client, collection=collection, embedding_model=embedding_model, dim=dim,
                        also_accept=also_accept, connect_later=connect_later)
        except BaseException:
            client.close()
            raise
        store._owns_client = True
        return store

    def _ensure_collections(self) -> None:
        if not self.client.collection_exists(self.collection):
            self._create(self.collection, dict(
                vectors_config={c.DENSE: m.VectorParams(
                    size=self.dim, distance=m.Distance.COSINE,
                    multivector_config=m.MultiVectorConfig(
                        comparator=m.MultiVectorComparator.MAX_SIM))},
                sparse_vectors_config={c.SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
                metadata={c.META_KEY: c.meta(self.embedding_model, self.dim)}))
            self._index(self.collection, c.TENANT_FIELD,
                        m.KeywordIndexParams(type=m.KeywordIndexType.KEYWORD, is_tenant=True))
            self._index(self.collection, c.CURRENT_FIELD, m.PayloadSchemaType.INTEGER)
            self._index(self.collection, c.ACCESS_FIELD, m.PayloadSchemaType.INTEGER)
            self._index(self.collection, c.PINNED_FIELD, m.PayloadSchemaType.INTEGER)
            for key in c.KEYWORD_INDEXES:
                self._index(self.collection, key, m.PayloadSchemaType.KEYWORD)
        info = self.client.get_collection(self.collection)
        if c.TEXT_KEY_FIELD not in (info.payload_schema or {}):  # a store from before it
            self._index(self.collection, c.TEXT_KEY_FIELD, m.PayloadSchemaType.KEYWORD)
        if c.ACCESS_FIELD not in (info.payload_schema or {}):  # likewise
            self._index(self.collection, c.ACCESS_FIELD, m.PayloadSchemaType.INTEGER)
        if c.PINNED_FIELD not in (info.payload_schema or {}):  # likewise; pinned items get it
            self._index(self.collection, c.PINNED_FIELD, m.PayloadSchemaType.INTEGER)
            self.client.set_payload(self.collection, {c.PINNED_FIELD: 1}, points=m.Filter(
                must=[m.FieldCondition(key="pinned", match=m.MatchValue(value=True))]))
        where = f"{self.collection!r} ({self._location()})"
        record = (info.config.metadata or {}).get(c.META_KEY)
        c.check_meta(record, self.embedding_model, self.dim, where, self.also_accept)
        self._multivector = c.is_multivector(record or {})
        dense = info.config.params.vectors
        size = dense[c.DENSE].size if isinstance(dense, dict) and c.DENSE in dense else None
        if size != self.dim:
            raise StoreError(f"collection {where} has no {self.dim}-dim vector {c.DENSE!r} "
                             f"(found {dense!r}); its metadata says otherwise: it was altered by hand")
        for field in c.SCOPE_FIELDS:  # current items without them get them
            if field not in (info.payload_schema or {}):
                self._index(self.collection, field, m.PayloadSchemaType.KEYWORD)
        self._settle_keys()
        if not self.client.collection_exists(self.cubes_collection):
            self._create(self.cubes_collection, dict(vectors_config={}))
            self._index(self.cubes_collection, c.CUBE_TENANT_FIELD, m.PayloadSchemaType.KEYWORD)

    def _settle_keys(self) -> None:
        """Keys on current versions that lack them; none on superseded ones. Through
        filters, so a replica superseding a version meanwhile is not undone."""
        unkeyed = self._scroll(self.collection, c.unkeyed_where(), ["tenant", "cube_id", "status"])
        for point_ids, fields in c.scope_groups(unkeyed):
            for chunk in c.chunks(point_ids):
                self.client.set_payload(self.collection, fields,
                                        points=_filter(c.unkeyed_where(c.HasIds(chunk))))
        stale = [pid for pid, _ in self._scroll(self.collection, c.stale_keyed_where(), [c.SCOPE_FIELD])]
        for chunk in c.chunks(stale):
            self.client.set_payload(self.collection, c.UNFLAG, points=_filter(
                c.Where((c.Match(c.CURRENT_FIELD, 0), c.HasIds(chunk)))))

    def _create(self, name: str, params: dict[str, Any]) -> None:
        try:
            self.client.create_collection(name, **params)
        except Exception:
            # Another replica may have created it between our check and our create.
            if not self.client.collection_exists(name):
                raise
            log.info("collection %s was created concurrently", name)

    def _index(self, collection: str, key: str, schema: m.PayloadSchemaType | m.KeywordIndexParams) -> None:
        self.client.create_payload_index(collection, key, field_schema=schema)

    def _location(self) -> str:
        options = self.client.init_options
        for key in ("url", "host", "path", "location"):
            if options.get(key):
                return str(options[key])
        return "qdrant"

    # -- helpers -------------------------------------------------------------------

    def _scroll(self, collection: str, where: c.Where,
                fields: list[str] | bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        offset: Any = None
        while True:
            records, offset = self.client.scroll(collection, scroll_filter=_filter(where), limit=_PAGE,
                                                 offset=offset, with_payload=fields, with_vectors=False)
            for r in records:
                yield str(r.id), r.payload or {}
            if offset is None:
                return

    def _unflag(self, tenant: str, point_ids: Sequence[str]) -> None:
        for chunk in c.chunks(point_ids):
            self.client.set_payload(self.collection, c.UNFLAG,
                                    points=_filter(c.tenant_where(tenant, c.HasIds(chunk))))

    def _erase(self, tenant: str, memory_ids: Sequence[str]) -> None:
        for chunk in c.chunks(memory_ids):
            self.client.delete(self.collection,
                               points_selector=_filter(c.tenant_where(tenant, c.MatchIn("id", chunk))))

    def _hits(self, points: list[m.ScoredPoint]) -> list[Hit]:
        return c.ranked([Hit(c.payload_item(p.payload or {}), float(p.score)) for p in points])

    # -- memory items ------------------------------------------------------------

    @_needs_open
    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        per_item = c.check_pieces(items, vectors, pieces)
        points = []
        for item, vector, item_pieces, current in zip(
                items, vectors, per_item, c.batch_currents(items), strict=True):
            indices, values = c.sparse_item(item)
            points.append(m.PointStruct(
                id=c.point_id(item),
                vector={c.DENSE: c.dense_value(vector, item_pieces, self.dim, self.multivector),
                        c.SPARSE: m.SparseVector(indices=indices, values=values)},
                payload=c.item_payload(item, current=current)))
        if not points:
            return
        self.client.upsert(self.collection, points, wait=True)
        by_tenant: dict[str, set[str]] = {}
        for item in items:
            by_tenant.setdefault(item.tenant, set()).add(item.id)
        for tenant, ids in by_tenant.items():
            for chunk in c.chunks(sorted(ids)):
                flagged = self._scroll(self.collection,
                                       c.tenant_where(tenant, c.MatchIn("id", chunk), current=True),
                                       ["id", "version"])
                self._unflag(tenant, c.stale_currents(flagged))

    @_needs_open
    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        records, _ = self.client.scroll(
            self.collection, limit=1, with_payload=True, with_vectors=False,
            scroll_filter=_filter(c.tenant_where(tenant, c.Match("id", memory_id), current=True)))
        return c.payload_item(records[0].payload or {}) if records else None

    @_needs_open
    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        where = c.tenant_where(tenant, c.Match("id", memory_id))
        return sorted((c.payload_item(p) for _, p in self._scroll(self.collection, where)),
                      key=lambda i: i.version)

    @_needs_open
    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        records, nxt = self.client.scroll(
            self.collection, scroll_filter=_filter(c.list_where(tenant, user, cube_id, status)),
            limit=limit, offset=c.decode_cursor(cursor) if cursor else None,
            with_payload=True, with_vectors=False)
        page = [c.payload_item(r.payload or {}) for r in records]
        return page, (c.encode_cursor(str(nxt)) if nxt is not None else None)

    @_needs_open
    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        pinned, _ = self.client.scroll(
            self.collection, scroll_filter=_filter(c.pinned_where(tenant, cube_id)), limit=limit,
            with_payload=True, with_vectors=False)
        hot, _ = self.client.scroll(
            self.collection, scroll_filter=_filter(c.active_where(tenant, cube_id)), limit=limit,
            with_payload=True, with_vectors=False,
            order_by=m.OrderBy(key=c.ACCESS_FIELD, direction=m.Direction.DESC))
        return c.unique_items([r.payload or {} for r in [*pinned, *hot]])

    @_needs_open
    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        where = c.scope_where(scope)
        if where is None or limit < 1:
            return []
        return self._hits(self.client.query_points(
            self.collection, query=c.dense_query(vector, self.dim, self.multivector), using=c.DENSE,
            query_filter=_filter(where), limit=limit, with_payload=True, with_vectors=False).points)

    @_needs_open
    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        where = c.scope_where(scope)
        indices, values = c.sparse_query(text)
        if where is None or limit < 1 or not indices:
            return []
        params = m.SearchParams(idf=m.IdfCorpusParams(corpus=_filter(c.idf_corpus(scope.tenant))))
        return self._hits(self.client.query_points(
            self.collection, query=m.SparseVector(indices=indices, values=values), using=c.SPARSE,
            query_filter=_filter(where), search_params=params, limit=limit,
            with_payload=True, with_vectors=False).points)

    @_needs_open
    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in c.chunks(sorted(set(keys))):
            found.update(p.get(c.TEXT_KEY_FIELD, "") for _, p in self._scroll(
                self.collection, c.texts_where(tenant, cube_id, chunk), [c.TEXT_KEY_FIELD]))
        return found

    @_needs_open
    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        where = c.list_where(tenant, None, cube_id, None)
        return int(self.client.count(self.collection, count_filter=_filter(where), exact=True).count)

    @_needs_open
    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        times = Counter(memory_ids)
        for chunk in c.chunks(sorted(times)):
            where = c.tenant_where(tenant, c.MatchIn("id", chunk), current=True)
            found = list(self._scroll(self.collection, where, ["id", "access_count"]))
            for point_ids, payload in c.touch_groups(found, times, at):
                # The ids come from the tenant's own points (the scroll above).
                self.client.set_payload(self.collection, payload, points=list(point_ids))

    @_needs_open
    def purge_user(self, tenant: str, user: str) -> int:
        where = c.tenant_where(tenant, c.Match("user", user))
        ids = sorted({p["id"] for _, p in self._scroll(self.collection, where, ["id"])})
        self._erase(tenant, ids)
        return len(ids)

    @_needs_open
    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        where = c.tenant_where(tenant, c.Match("cube_id", cube_id), current=True)
        ids = sorted({p["id"] for _, p in self._scroll(self.collection, where, ["id"])})
        self._erase(tenant, ids)
        return len(ids)

    # -- cubes ---------------------------------------------------------------------

    @_needs_open
    def put_cube(self, cube: Cube) -> None:
        self.client.upsert(self.cubes_collection, [m.PointStruct(
            id=c.cube_point_id(cube.tenant, cube.id), vector={}, payload=c.cube_payload(cube))], wait=True)

    @_needs_open
    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        # The record's id is made from the tenant: another tenant's cube is unreachable.
        found = self.client.retrieve(self.cubes_collection, [c.cube_point_id(tenant, cube_id)],
                                     with_payload=True, with_vectors=False)
        return c.payload_cube(found[0].payload or {}) if found else None

    @_needs_open
    def list_cubes(self, tenant: str) -> list[Cube]:
        records = self._scroll(self.cubes_collection, c.cube_where(tenant))
        return sorted((c.payload_cube(p) for _, p in records), key=lambda cube: cube.id)

    @_needs_open
    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        point_id = c.cube_point_id(tenant, cube_id)
        if not self.client.retrieve(self.cubes_collection, [point_id],
                                    with_payload=False, with_vectors=False):
            return False
        self.client.delete(self.cubes_collection, points_selector=m.PointIdsList(points=[point_id]),
                           wait=True)
        return True

    @_needs_open
    def probe(self) -> None:
        """A read and a write: a server can refuse writes alone (its disk full, a
        read-only replica). The write is a payload-only point among the cubes that no
        cube filter matches."""
        self.client.retrieve(self.collection, [c.PROBE_ID], with_payload=False, with_vectors=False)
        self.client.upsert(self.cubes_collection, [m.PointStruct(
            id=c.PROBE_ID, vector={}, payload={"probe": 1})], wait=True)

    def close(self) -> None:
        # Writes wait for the server's acknowledgement: nothing is left to flush.
        if self._owns_client:
            self.client.close()
