"""One suite for every MemoryStore backend: Qdrant Edge and a Qdrant server (here
qdrant-client's in-process mode stands in for the server).

Each test runs against both; ``test_backends_rank_alike`` then loads the same data
into both and checks they answer with the same ids in the same order.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from memory.embedding import minilm
from memory.embedding.base import HashEmbedder
from memory.models import Cube, MemoryItem, Source, text_key
from memory.store import MemoryStore, Scope, StoreError, StoreMismatchError
from memory.store.edge import EdgeStore
from memory.store.layout import (
    CURRENT_FIELD,
    DENSE,
    META_KEY,
    PINNED_FIELD,
    SCOPE_FIELDS,
    SPARSE,
    item_payload,
    meta,
    scope_key,
)
from memory.store.server import ServerStore
from memory.store.sparse import sparse_item

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local Qdrant")

EMB = HashEmbedder(dim=256)
T0 = 1_732_300_000


class Backend:
    """Opens (and reopens) one backend's store at one location."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "edge"
        self.client = QdrantClient(location=":memory:") if kind == "server" else None
        self.store: MemoryStore | None = None

    def open(self, model: str = EMB.model_id, dim: int = EMB.dim,
             also_accept: frozenset[str] = frozenset()) -> MemoryStore:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.client is not None:
            self.store = ServerStore(self.client, embedding_model=model, dim=dim,
                                     also_accept=also_accept)
        else:
            self.store = EdgeStore(self.path, embedding_model=model, dim=dim,
                                   also_accept=also_accept)
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.client is not None:
            self.client.close()


@pytest.fixture(params=["edge", "server"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    yield b
    b.close()


@pytest.fixture
def store(backend: Backend) -> MemoryStore:
    return backend.open()


def mk(memory_id: str, text: str, *, tenant: str = "t1", user: str = "u1", cube: str = "c1",
       version: int = 1, **fields: object) -> MemoryItem:
    return MemoryItem.model_validate({
        "id": memory_id, "tenant": tenant, "cube_id": cube, "user": user, "text": text,
        "version": version, "created_at": T0, "updated_at": T0 + version, **fields})


def put(store: MemoryStore, *items: MemoryItem) -> None:
    store.upsert(items, EMB.embed([i.text for i in items]))


def ids(rows: list) -> list[str]:
    return [getattr(r, "item", r).id for r in rows]


# -- round trip, versions, history --------------------------------------------------

def test_upsert_then_get_round_trips_every_field(store: MemoryStore) -> None:
    item = mk("m1", "Alice prefers green tea in the morning", type="preference", tags=["drinks", "am"],
              pinned=True, status="archived", version=3, access_count=4, last_accessed_at=T0 + 9,
              extractor="fine", sources=[
                  Source(request_id="r1", session_id="s1", role="user", at=T0, ref="D1:3"),
                  Source(role="assistant", at=T0 + 1)])
    put(store, item)
    assert store.get("t1", "m1") == item
    assert store.history("t1", "m1") == [item]
    assert store.get("t1", "nope") is None
    assert store.history("t1", "nope") == []


def test_new_version_becomes_current_and_history_keeps_every_version(store: MemoryStore) -> None:
    v1, v2, v3 = (mk("m1", text, version=n) for n, text in
                  [(1, "Bob drinks tea"), (2, "Bob drinks black tea"), (3, "Bob drinks coffee now")])
    put(store, v1)
    put(store, v2)
    put(store, v3)
    assert store.get("t1", "m1") == v3
    assert store.history("t1", "m1") == [v1, v2, v3]
    assert store.count("t1") == 1
    assert store.list_items("t1") == ([v3], None)
    assert ids(store.search_dense(Scope("t1"), EMB.embed_one("Bob drinks tea"), 10)) == ["m1"]
    assert store.search_dense(Scope("t1"), EMB.embed_one("Bob drinks tea"), 10)[0].item == v3
    assert store.search_sparse(Scope("t1"), "tea", 10) == []
    assert ids(store.search_sparse(Scope("t1"), "coffee", 10)) == ["m1"]


def test_versions_in_one_batch_leave_the_highest_current(store: MemoryStore) -> None:
    v1, v2 = mk("m1", "first words", version=1), mk("m1", "second words", version=2)
    put(store, v2, v1)
    assert store.get("t1", "m1") == v2
    assert store.history("t1", "m1") == [v1, v2]
    assert store.count("t1") == 1


def test_replayed_upsert_is_idempotent_and_never_regresses(store: MemoryStore) -> None:
    v1, v2 = mk("m1", "lives in Paris", version=1), mk("m1", "lives in Lyon", version=2)
    put(store, v1)
    put(store, v2)
    put(store, v2)
    put(store, v1)  # an outbox replay of an older write
    assert store.get("t1", "m1") == v2
    assert store.history("t1", "m1") == [v1, v2]
    assert store.list_items("t1") == ([v2], None)
    assert store.count("t1") == 1


def test_upsert_refuses_a_vector_of_another_dimension(store: MemoryStore) -> None:
    with pytest.raises(StoreMismatchError, match="dims"):
        store.upsert([mk("m1", "x")], [[0.1] * (EMB.dim - 1)])
    assert store.get("t1", "m1") is None


# -- tenants, scopes, filters ---------------------------------------------------------

def two_tenants(store: MemoryStore) -> tuple[MemoryItem, MemoryItem]:
    a = mk("m1", "the launch code is orange", tenant="t1", tags=["a"])
    b = mk("m1", "the launch code is orange", tenant="t2", tags=["b"])
    put(store, a, b)
    return a, b


def test_tenants_never_see_each_other(store: MemoryStore) -> None:
    a, b = two_tenants(store)
    assert store.get("t1", "m1") == a and store.get("t2", "m1") == b
    assert store.get("t3", "m1") is None and store.history("t3", "m1") == []
    assert store.history("t2", "m1") == [b]
    assert store.list_items("t2") == ([b], None)
    assert [h.item for h in store.search_dense(Scope("t2"), EMB.embed_one(a.text), 10)] == [b]
    assert [h.item for h in store.search_sparse(Scope("t2"), "orange", 10)] == [b]
    assert store.search_sparse(Scope("t3"), "orange", 10) == []
    assert store.count("t1") == store.count("t2") == 1 and store.count("t3") == 0


def test_tenant_writes_leave_other_tenants_alone(store: MemoryStore) -> None:
    a, b = two_tenants(store)
    put(store, mk("m1", "the launch code is purple", tenant="t1", version=2))
    store.touch("t1", ["m1"], T0 + 50)
    assert store.get("t2", "m1") == b
    assert store.purge_user("t1", "u1") == 1
    assert store.get("t2", "m1") == b
    put(store, a)
    assert store.delete_cube_items("t2", "c1") == 1
    assert store.get("t1", "m1") == a and store.get("t2", "m1") is None


def scoped_corpus(store: MemoryStore) -> None:
    put(store,
        mk("a", "rust memory safety", user="u1", cube="c1"),
        mk("b", "rust borrow checker", user="u2", cube="c1"),
        mk("c", "rust async runtime", user="u1", cube="c2"),
        mk("d", "rust macros", user="u1", cube="c1", status="archived"),
        mk("e", "rust unsafe code", user="u1", cube="c1", status="deleted"))


def test_search_scope_filters_cube_user_and_status(store: MemoryStore) -> None:
    scoped_corpus(store)

    def found(scope: Scope) -> set[str]:
        sparse = set(ids(store.search_sparse(scope, "rust", 10)))
        dense = set(ids(store.search_dense(scope, EMB.embed_one("rust"), 10)))
        assert sparse == dense
        return sparse

    assert found(Scope("t1")) == {"a", "b", "c"}
    assert found(Scope("t1", cube_ids=["c1"])) == {"a", "b"}
    assert found(Scope("t1", cube_ids=["c1", "c2"], user="u1")) == {"a", "c"}
    assert found(Scope("t1", statuses=("archived", "deleted"))) == {"d", "e"}
    assert found(Scope("t1", cube_ids=[])) == set()
    assert found(Scope("t1", statuses=())) == set()
    assert found(Scope("t1", cube_ids=["c9"])) == set()
    # Cube scopes (recall's: one condition on scope keys) with statuses, and a new
    # version that moves an item to another cube and status.
    assert found(Scope("t1", cube_ids=["c1", "c2"], statuses=("active", "archived"))) == {
        "a", "b", "c", "d"}
    put(store, mk("a", "rust memory safety", user="u1", cube="c2", status="archived", version=2))
    assert found(Scope("t1", cube_ids=["c1"])) == {"b"}
    assert found(Scope("t1", cube_ids=["c2"], statuses=("archived",))) == {"a"}
    assert found(Scope("t2", cube_ids=["c1", "c2"])) == set()


def test_a_store_from_before_scope_keys_gets_them_at_open(backend: Backend) -> None:
    store = backend.open()
    scoped_corpus(store)
    put(store, mk("b", "rust borrow checker v2", user="u2", cube="c1", version=2))
    # What a store written before the fields looks like: no indexes, no fields.
    if backend.client is not None:
        for field in SCOPE_FIELDS:
            backend.client.delete_payload_index("memcube_memories", field)
        from qdrant_client import models as m

        backend.client.delete_payload("memcube_memories", list(SCOPE_FIELDS),
                                      points=m.FilterSelector(filter=m.Filter()))
    else:
        from qdrant_edge import Filter, UpdateOperation

        shard = store.engine.shard  # type: ignore[attr-defined]
        for field in SCOPE_FIELDS:
            shard.update(UpdateOperation.delete_field_index(field))
        shard.update(UpdateOperation.delete_payload_by_filter(Filter(must=[]), list(SCOPE_FIELDS)))
    assert store.search_sparse(Scope("t1", cube_ids=["c1"]), "rust", 10) == []
    store = backend.open()
    hits = store.search_sparse(Scope("t1", cube_ids=["c1"]), "rust", 10)
    assert {h.item.id: h.item.version for h in hits} == {"a": 1, "b": 2}
    assert set(ids(store.search_dense(Scope("t1", cube_ids=["c1", "c2"]), EMB.embed_one("rust"), 10))) == {
        "a", "b", "c"}


def write_as_older_release(backend: Backend, store: MemoryStore, item: MemoryItem,
                           superseded: MemoryItem | None = None) -> None:
    """Write ``item`` as the release before scope keys did: no keys on it, and a
    superseded version loses ``current`` alone."""
    payload = {k: v for k, v in item_payload(item, current=True).items() if k not in SCOPE_FIELDS}
    vector = EMB.embed_one(item.text)
    indices, values = sparse_item(item)
    if backend.client is not None:
        from qdrant_client import models as m

        backend.client.upsert("memcube_memories", [m.PointStruct(
            id=item.point_id, payload=payload, vector={
                DENSE: [vector], SPARSE: m.SparseVector(indices=indices, values=values)})])
        if superseded is not None:
            backend.client.set_payload("memcube_memories", {CURRENT_FIELD: 0},
                                       points=[superseded.point_id])
    else:
        from qdrant_edge import Point, SparseVector, UpdateOperation

        shard = store.engine.shard  # type: ignore[attr-defined]
        shard.update(UpdateOperation.upsert_points([Point(
            item.point_id, {DENSE: [vector], SPARSE: SparseVector(indices, values)}, payload)]))
        if superseded is not None:
            shard.update(UpdateOperation.set_payload([superseded.point_id], {CURRENT_FIELD: 0}))


def test_versions_an_older_release_superseded_lose_their_keys_at_open(backend: Backend) -> None:
    store = backend.open()
    old = mk("a", "rust memory safety", user="u1", cube="c1")
    put(store, old)
    new = mk("a", "rust deleted now", user="u1", cube="c1", status="deleted", version=2)
    write_as_older_release(backend, store, new, superseded=old)
    scope = Scope("t1", cube_ids=["c1"])
    # Until the next open, recall would still find the superseded text by its key.
    assert [(h.item.id, h.item.version) for h in store.search_sparse(scope, "rust", 10)] == [("a", 1)]
    store = backend.open()
    assert store.search_sparse(scope, "rust", 10) == []
    assert ids(store.search_sparse(Scope("t1", cube_ids=["c1"], statuses=("deleted",)), "rust", 10)) == [
        "a"]
    got = store.get("t1", "a")
    assert got is not None and got.version == 2


def test_items_written_without_scope_keys_get_them_at_the_next_open(backend: Backend) -> None:
    """What an older replica on the same Qdrant writes after an upgraded one created
    the indexes: items without keys, given theirs when a store opens."""
    store = backend.open()
    scoped_corpus(store)
    keyless = mk("k", "rust from an older replica", user="u1", cube="c1")
    write_as_older_release(backend, store, keyless)
    vector = EMB.embed_one(keyless.text)
    scope = Scope("t1", cube_ids=["c1"])
    assert "k" not in ids(store.search_sparse(scope, "rust", 10))
    store = backend.open()
    assert set(ids(store.search_sparse(scope, "rust", 10))) == {"a", "b", "k"}
    assert set(ids(store.search_dense(scope, vector, 10))) == {"a", "b", "k"}


def test_list_items_and_count_filter_by_user_cube_and_status(store: MemoryStore) -> None:
    scoped_corpus(store)

    def listed(**kw: object) -> set[str]:
        rows, cursor = store.list_items("t1", **kw)  # type: ignore[arg-type]
        assert cursor is None
        return set(ids(rows))

    assert listed() == {"a", "b", "c", "d", "e"}
    assert listed(user="u2") == {"b"}
    assert listed(cube_id="c2") == {"c"}
    assert listed(status="deleted") == {"e"}
    assert listed(user="u1", cube_id="c1", status="active") == {"a"}
    assert store.count("t1") == 5 and store.count("t1", cube_id="c1") == 4


# -- ranking --------------------------------------------------------------------------

DENSE_TEXTS = {
    "d1": "the quick brown fox jumps over the lazy dog",
    "d2": "a quick brown fox",
    "d3": "brown bread for breakfast",
    "d4": "quarterly revenue grew in europe",
    "d5": "the lazy dog sleeps all day",
}


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b))


def test_dense_search_ranks_texts_sharing_words_first(store: MemoryStore) -> None:
    put(store, *(mk(k, v) for k, v in DENSE_TEXTS.items()))
    query = EMB.embed_one("quick brown fox")
    hits = store.search_dense(Scope("t1"), query, 3)
    expected = sorted(DENSE_TEXTS, key=lambda k: -cosine(query, EMB.embed_one(DENSE_TEXTS[k])))
    assert ids(hits) == expected[:3]
    assert ids(hits)[:2] == ["d2", "d1"]
    for hit in hits:
        assert hit.score == pytest.approx(cosine(query, EMB.embed_one(hit.item.text)), abs=1e-5)


SPARSE_TEXTS = {
    "s1": "we ordered pizza on friday",
    "s2": "pizza again for lunch",
    "s3": "cold pizza is the best pizza",
    "s4": "a trip to zanzibar next spring",
    "s5": "the pizza place near the office closed",
    "s6": "garden plans for spring",
}


def test_sparse_search_finds_rare_words_and_weights_them_by_idf(store: MemoryStore) -> None:
    put(store, *(mk(k, v) for k, v in SPARSE_TEXTS.items()))
    # "zanzibar" is in one text, "pizza" in four: the rare word outweighs the common one.
    assert ids(store.search_sparse(Scope("t1"), "zanzibar", 10)) == ["s4"]
    top = store.search_sparse(Scope("t1"), "pizza zanzibar", 10)
    assert ids(top)[0] == "s4"
    assert set(ids(top)) == {"s1", "s2", "s3", "s4", "s5"}
    # Two mentions beat one; the shorter of the one-mention texts beats the longer.
    assert ids(store.search_sparse(Scope("t1"), "pizza", 2)) == ["s3", "s2"]
    assert ids(store.search_sparse(Scope("t1"), "spring", 10)) == ["s6", "s4"]
    assert store.search_sparse(Scope("t1"), "kangaroo", 10) == []
    assert store.search_sparse(Scope("t1"), "the of a", 10) == []  # stopwords only


def test_context_is_searched_below_the_items_own_words(store: MemoryStore) -> None:
    # A bare reply is found through the question it answered, but an item that says
    # the word itself ranks first; the context comes back stored, unchanged.
    put(store, mk("reply", "Yes, every Sunday since I was ten!",
                  context="Do you still play the clarinet?"),
        mk("direct", "My clarinet needs a new reed"), mk("other", "Sunday lunch at noon"))
    assert ids(store.search_sparse(Scope("t1"), "clarinet", 10)) == ["direct", "reply"]
    assert ids(store.search_sparse(Scope("t1"), "sunday", 10))[0] in ("reply", "other")
    got = store.get("t1", "reply")
    assert got is not None and got.context == "Do you still play the clarinet?"
    assert store.get("t1", "direct").context is None  # type: ignore[union-attr]


def test_existing_texts_finds_active_current_items_of_the_cube_only(store: MemoryStore) -> None:
    put(store, mk("a", "I like  Tea"), mk("b", "old words", version=1),
        mk("b", "new words", version=2), mk("d", "gone", status="deleted"),
        mk("o", "other cube", cube="c2"), mk("x", "I like tea", tenant="t2"))
    asked = {text_key(t): t for t in ("i like tea", "old words", "new words", "gone",
                                       "other cube", "never said")}
    found = store.existing_texts("t1", "c1", sorted(asked))
    assert sorted(asked[k] for k in found) == ["i like tea", "new words"]
    assert store.existing_texts("t1", "c1", []) == set()


def test_idf_is_measured_over_the_tenants_current_items_only(store: MemoryStore) -> None:
    put(store, *(mk(k, v) for k, v in SPARSE_TEXTS.items()))
    alone = [(h.item.id, h.score) for h in store.search_sparse(Scope("t1"), "pizza zanzibar", 10)]
    # Another tenant full of "zanzibar", and superseded versions, move nothing.
    put(store, *(mk(f"x{n}", "zanzibar zanzibar", tenant="t2") for n in range(20)))
    put(store, mk("s6", "zanzibar trip", version=1, user="u9"),
        mk("s6", "garden plans for spring", version=2))
    now = [(h.item.id, h.score) for h in store.search_sparse(Scope("t1"), "pizza zanzibar", 10)]
    assert [i for i, _ in now] == [i for i, _ in alone]
    assert [s for _, s in now] == pytest.approx([s for _, s in alone], rel=1e-5)


# -- pagination -----------------------------------------------------------------------

def test_list_items_pages_cover_every_item_once_in_a_stable_order(store: MemoryStore) -> None:
    put(store, *(mk(f"m{n:02}", f"note number {n}") for n in range(25)))
    put(store, mk("m03", "note number 3 revised", version=2))
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        rows, cursor = store.list_items("t1", limit=7, cursor=cursor)
        seen += ids(rows)
        pages += 1
        if cursor is None:
            break
        assert len(rows) == 7
    assert pages == 4
    assert sorted(seen) == [f"m{n:02}" for n in range(25)]
    assert store.list_items("t1", limit=100)[0] == [store.get("t1", i) for i in seen]
    with pytest.raises(ValueError, match="cursor"):
        store.list_items("t1", cursor="not-a-cursor")


# -- touch, erasure ----------------------------------------------------------------------

def test_touch_counts_accesses_without_a_new_version(store: MemoryStore) -> None:
    put(store, mk("m1", "x marks the spot", version=1), )
    put(store, mk("m1", "x marks the spot again", version=2), mk("m2", "other"))
    store.touch("t1", ["m1", "unknown"], T0 + 100)
    store.touch("t1", ["m1", "m2"], T0 + 200)
    got = store.get("t1", "m1")
    assert got is not None and (got.version, got.access_count, got.last_accessed_at) == (2, 2, T0 + 200)
    assert [i.access_count for i in store.history("t1", "m1")] == [0, 2]
    m2 = store.get("t1", "m2")
    assert m2 is not None and (m2.access_count, m2.last_accessed_at) == (1, T0 + 200)
    store.touch("t2", ["m1"], T0 + 300)
    assert store.get("t1", "m1") == got
    # Points reaching the same count share one update; others get their own.
    put(store, mk("m3", "third"), mk("m4", "fourth"), mk("m5", "fifth"))
    store.touch("t1", ["m3", "m4", "m5", "m5", "m2"], T0 + 400)
    counts = {k: store.get("t1", k) for k in ("m2", "m3", "m4", "m5")}
    assert {k: (v.access_count, v.last_accessed_at) for k, v in counts.items() if v} == {
        "m2": (2, T0 + 400), "m3": (1, T0 + 400), "m4": (1, T0 + 400), "m5": (2, T0 + 400)}


def test_block_candidates_are_pinned_and_most_accessed_active_items(store: MemoryStore) -> None:
    put(store, mk("p1", "pinned one", pinned=True), mk("p2", "pinned two", pinned=True),
        mk("old", "was pinned", version=1, pinned=True),
        mk("gone", "pinned but deleted", pinned=True, status="deleted"),
        mk("other", "pinned elsewhere", pinned=True, cube="c2"),
        mk("theirs", "pinned for t2", pinned=True, tenant="t2"),
        *(mk(f"h{n}", f"hot number {n}", access_count=n) for n in range(1, 8)))
    put(store, mk("old", "was pinned, not now", version=2, pinned=False))
    store.touch("t1", ["h1"] * 20, T0 + 5)  # now the hottest
    got = {i.id: i for i in store.block_candidates("t1", "c1", 3)}
    pinned = {k for k, v in got.items() if v.pinned}
    assert pinned == {"p1", "p2"}
    hot = [k for k, v in sorted(got.items(), key=lambda kv: -kv[1].access_count)
           if not v.pinned][:3]
    assert hot == ["h1", "h7", "h6"]
    assert got["h1"].access_count == 21
    assert store.block_candidates("t1", "nope", 3) == []


def test_purge_user_erases_every_version_of_their_items(store: MemoryStore) -> None:
    put(store, mk("a", "alpha", user="u1"), mk("b", "beta", user="u1"), mk("c", "gamma", user="u2"),
        mk("a", "alpha", user="u1", tenant="t2"))
    put(store, mk("a", "alpha two", user="u1", version=2))
    assert store.purge_user("t1", "u1") == 2
    assert store.history("t1", "a") == [] and store.history("t1", "b") == []
    assert ids(store.list_items("t1")[0]) == ["c"]
    assert store.search_sparse(Scope("t1"), "alpha", 10) == []
    assert store.get("t2", "a") is not None
    assert store.purge_user("t1", "u1") == 0


def test_delete_cube_items_erases_every_version_in_the_cube(store: MemoryStore) -> None:
    put(store, mk("a", "alpha", cube="c1"), mk("b", "beta", cube="c2"))
    put(store, mk("a", "alpha two", cube="c1", version=2))
    assert store.delete_cube_items("t1", "c1") == 1
    assert store.history("t1", "a") == []
    assert ids(store.list_items("t1")[0]) == ["b"]
    assert store.count("t1", cube_id="c1") == 0 and store.count("t1") == 1


# -- cubes ----------------------------------------------------------------------------

def test_cubes_crud_is_scoped_by_tenant(store: MemoryStore) -> None:
    shared = Cube(id="team", tenant="t1", name="Team notes", kind="shared", description="d",
                  created_at=T0)
    mine = Cube(id="c1", tenant="t1", name="u1", kind="user", owner="u1", created_at=T0)
    theirs = Cube(id="team", tenant="t2", name="Other team", kind="shared", created_at=T0)
    for cube in (shared, mine, theirs):
        store.put_cube(cube)
    assert store.get_cube("t1", "team") == shared
    assert store.get_cube("t2", "team") == theirs
    assert store.get_cube("t3", "team") is None
    assert store.list_cubes("t1") == [mine, shared]
    renamed = shared.model_copy(update={"name": "Renamed"})
    store.put_cube(renamed)
    assert store.list_cubes("t1") == [mine, renamed]
    assert store.delete_cube("t1", "team") is True
    assert store.delete_cube("t1", "team") is False
    assert store.get_cube("t1", "team") is None
    assert store.list_cubes("t2") == [theirs]


# -- model, durability -------------------------------------------------------------------

def test_opening_with_another_model_or_dimension_is_refused(backend: Backend) -> None:
    put(backend.open(), mk("m1", "kept"))
    with pytest.raises(StoreMismatchError) as err:
        backend.open(model="other-model", dim=EMB.dim)
    assert f"{EMB.model_id} ({EMB.dim} dims)" in str(err.value)
    assert f"other-model ({EMB.dim} dims)" in str(err.value)
    with pytest.raises(StoreMismatchError, match=f"configured with {EMB.model_id} \\(768 dims\\)"):
        backend.open(dim=768)
    assert backend.open().get("t1", "m1") is not None


def test_the_same_model_at_another_precision_opens_the_store(backend: Backend) -> None:
    # What MiniLMEmbedder declares as its vector space (at q8_0: the other precisions).
    q8_0, space = minilm.model_id("q8_0"), minilm.SAME_SPACE - {minilm.model_id("q8_0")}
    put(backend.open(model=minilm.model_id("f16")), mk("m1", "kept"))
    store = backend.open(model=q8_0, also_accept=space)
    assert store.get("t1", "m1") is not None
    with pytest.raises(StoreMismatchError):
        # another model, declaring its own space
        backend.open(model="all-MiniLM-L12-v2:gguf-q8_0",
                     also_accept=frozenset({"all-MiniLM-L12-v2:gguf-f16"}))
    with pytest.raises(StoreMismatchError):
        backend.open(model="all-MiniLM-L6-v2")  # an embeddings API of that name: not ours
    with pytest.raises(StoreMismatchError):
        backend.open(model=q8_0)  # nothing declared: only the exact model


@pytest.mark.slow
def test_edge_store_builds_its_search_index_when_opened(tmp_path: Path) -> None:
    # Enough 384-dim points for Edge to index (measured threshold: between 6k and 8k).
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(8000, 384))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = EdgeStore(tmp_path / "s", embedding_model="m", dim=384)
    for lo in range(0, 8000, 2000):
        store.upsert([mk(f"m{n}", f"note {n}") for n in range(lo, lo + 2000)],
                     vectors[lo:lo + 2000].tolist())
    before = store.engine.shard.info().indexed_vectors_count  # type: ignore[attr-defined]
    query = vectors[1234].tolist()
    scanned = [h.item.id for h in store.search_dense(Scope("t1"), query, 10)]
    assert scanned[0] == "m1234"
    store.close()
    store = EdgeStore(tmp_path / "s", embedding_model="m", dim=384)
    assert store.engine.shard.info().indexed_vectors_count == before + 8000  # type: ignore[attr-defined]
    indexed = [h.item.id for h in store.search_dense(Scope("t1"), query, 10)]
    # Approximate search: the same item first, and (nearly) the same neighbours.
    assert indexed[0] == "m1234" and len(set(indexed) & set(scanned)) >= 8
    store.close()


def test_edge_store_from_before_pinned_flags_gets_them_at_open(tmp_path: Path) -> None:
    from qdrant_edge import Filter, UpdateOperation

    store = EdgeStore(tmp_path / "s", embedding_model=EMB.model_id, dim=EMB.dim)
    put(store, mk("p1", "pinned long ago", pinned=True), mk("n1", "not pinned", access_count=3))
    shard = store.engine.shard  # type: ignore[attr-defined]
    # What a store written before the flag looks like: no index, no field.
    shard.update(UpdateOperation.delete_field_index(PINNED_FIELD))
    shard.update(UpdateOperation.delete_payload_by_filter(Filter(must=[]), [PINNED_FIELD]))
    # limit 1: the hottest is n1, so p1 can only come as a pinned item
    assert [i.id for i in store.block_candidates("t1", "c1", 1)] == ["n1"]
    store.close()
    store = EdgeStore(tmp_path / "s", embedding_model=EMB.model_id, dim=EMB.dim)
    assert sorted(i.id for i in store.block_candidates("t1", "c1", 1)) == ["n1", "p1"]
    store.close()


def test_edge_store_reopens_with_everything(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "s", embedding_model=EMB.model_id, dim=EMB.dim)
    put(store, *(mk(k, v) for k, v in SPARSE_TEXTS.items()))
    put(store, mk("s1", "we ordered pizza on saturday", version=2))
    store.touch("t1", ["s2"], T0 + 7)
    store.put_cube(Cube(id="c1", tenant="t1", name="n", created_at=T0))
    store.upsert([], [])
    before = (store.list_items("t1"), store.history("t1", "s1"),
              [(h.item.id, h.score) for h in store.search_sparse(Scope("t1"), "pizza", 10)])
    store.optimize()  # rebuilds segments: nothing may change
    assert (store.list_items("t1"), store.history("t1", "s1"),
            [(h.item.id, h.score) for h in store.search_sparse(Scope("t1"), "pizza", 10)]) == before
    store.close()
    store.close()
    again = EdgeStore(tmp_path / "s", embedding_model=EMB.model_id, dim=EMB.dim)
    try:
        after = (again.list_items("t1"), again.history("t1", "s1"),
                 [(h.item.id, h.score) for h in again.search_sparse(Scope("t1"), "pizza", 10)])
        assert after == before
        assert again.get_cube("t1", "c1") is not None
        assert ids(again.search_dense(Scope("t1"), EMB.embed_one("saturday pizza"), 1)) == ["s1"]
    finally:
        again.close()


def test_edge_store_keeps_acknowledged_writes_after_a_crash(tmp_path: Path) -> None:
    child = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from memory.embedding.base import HashEmbedder
        from memory.models import MemoryItem
        from memory.store.edge import EdgeStore
        emb = HashEmbedder(dim={EMB.dim})
        store = EdgeStore(Path({str(tmp_path / "s")!r}), embedding_model=emb.model_id, dim=emb.dim)
        item = MemoryItem(id="m1", tenant="t1", cube_id="c1", user="u1", text="survives a crash")
        store.upsert([item], emb.embed([item.text]))
        os._exit(0)  # no close, no flush
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    store = EdgeStore(tmp_path / "s", embedding_model=EMB.model_id, dim=EMB.dim)
    try:
        got = store.get("t1", "m1")
        assert got is not None and got.text == "survives a crash"
    finally:
        store.close()


# -- both backends, same answers ------------------------------------------------------------

def test_backends_rank_alike(tmp_path: Path) -> None:
    edge, server = Backend("edge", tmp_path), Backend("server", tmp_path)
    try:
        stores = [edge.open(), server.open()]
        corpus = [mk(k, v) for k, v in (DENSE_TEXTS | SPARSE_TEXTS).items()]
        # Texts of distinct lengths, so no two scores tie and the order is fully determined.
        filler = "red green blue amber violet silver golden maroon cyan indigo olive".split()
        corpus += [mk(f"n{n:02}", f"pizza {word} " + " ".join(filler[:n]), user=f"u{n % 3}")
                   for n, word in enumerate(["fox", "dog", "office", "spring", "garden", "tea"] * 2)]
        for s in stores:
            put(s, *corpus)
            put(s, mk("s2", "pizza twice for a late lunch", version=2))

        def answers(s: MemoryStore) -> list[object]:
            out: list[object] = []
            for query in ["pizza", "zanzibar spring", "lazy dog", "garden tea pizza"]:
                for scope in [Scope("t1"), Scope("t1", user="u1")]:
                    out.append([(h.item.id, round(h.score, 4))
                                for h in s.search_sparse(scope, query, 50)])
                    # Limits past the corpus size: no tie straddles a cutoff, and equal scores
                    # come out by id. Texts sharing no word with the query score ~0.
                    out.append([(h.item.id, round(h.score, 4))
                                for h in s.search_dense(scope, EMB.embed_one(query), 50) if h.score > 1e-6])
            pages, cursor = [], None
            while True:
                rows, cursor = s.list_items("t1", limit=5, cursor=cursor)
                pages.append(ids(rows))
                if cursor is None:
                    break
            out += [pages, s.history("t1", "s2"), s.count("t1")]
            return out

        assert answers(stores[0]) == answers(stores[1])
    finally:
        edge.close()
        server.close()


def test_server_store_from_an_unreachable_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot open Qdrant collection"):
        ServerStore.from_url("http://127.0.0.1:9", embedding_model=EMB.model_id, dim=EMB.dim,
                             check_compatibility=False)  # its check runs in a thread, and warns late


# -- sentence pieces (multivector) ---------------------------------------------------

PIECE_TEXTS = {
    "m1": "We drove to the coast. The car broke down near a small fishing village.",
    "m2": "The car broke down near a small fishing village, they say",
}


def put_with_pieces(store: MemoryStore, *items: MemoryItem) -> None:
    from memory.pieces import embed_with_pieces

    vectors, pieces = embed_with_pieces(EMB, [i.text for i in items])
    store.upsert(items, vectors, pieces)


def test_dense_search_scores_an_item_by_its_best_piece(store: MemoryStore) -> None:
    assert store.multivector
    put_with_pieces(store, *(mk(k, v) for k, v in PIECE_TEXTS.items()))
    query = EMB.embed_one("The car broke down near a small fishing village.")
    # By whole texts m2 (one sentence) would lead; m1 has a sentence that is the query.
    assert cosine(query, EMB.embed_one(PIECE_TEXTS["m2"])) > cosine(query, EMB.embed_one(PIECE_TEXTS["m1"]))
    hits = store.search_dense(Scope("t1"), query, 2)
    assert ids(hits) == ["m1", "m2"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1].score == pytest.approx(cosine(query, EMB.embed_one(PIECE_TEXTS["m2"])), abs=1e-5)


def test_upsert_refuses_pieces_that_do_not_match_the_items(store: MemoryStore) -> None:
    item = mk("m1", "one. two.")
    with pytest.raises(ValueError, match="piece lists"):
        store.upsert([item], EMB.embed([item.text]), [])
    with pytest.raises(StoreMismatchError):
        store.upsert([item], EMB.embed([item.text]), [[[0.0] * (EMB.dim + 1)]])


def legacy_store(backend: Backend) -> MemoryStore:
    """A store as written before pieces (schema 1: one plain vector per item)."""
    old_meta = meta(EMB.model_id, EMB.dim) | {"schema": 1}
    if backend.client is not None:
        from qdrant_client import models as m

        backend.client.create_collection(
            "memcube_memories",
            vectors_config={DENSE: m.VectorParams(size=EMB.dim, distance=m.Distance.COSINE)},
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
            metadata={META_KEY: old_meta})
    else:
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeShard,
            EdgeSparseVectorParams,
            EdgeVectorParams,
            Modifier,
            Point,
            UpdateOperation,
        )

        from memory.store.engines.edge import META_ID

        shard = EdgeShard.create(str(backend.path), EdgeConfig(
            vectors={DENSE: EdgeVectorParams(size=EMB.dim, distance=Distance.Cosine)},
            sparse_vectors={SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)}))
        shard.update(UpdateOperation.upsert_points([Point(META_ID, {}, {META_KEY: old_meta})]))
        shard.flush()
        shard.close()
    return backend.open()


def test_a_store_from_before_pieces_still_serves_by_whole_text(backend: Backend) -> None:
    store = legacy_store(backend)
    assert not store.multivector
    from memory.pieces import embed_with_pieces

    items = [mk(k, v) for k, v in PIECE_TEXTS.items()]
    _, pieces = embed_with_pieces(EMB, [i.text for i in items])
    assert pieces[0]
    store.upsert(items, EMB.embed([i.text for i in items]), pieces)  # pieces ignored
    query = EMB.embed_one("The car broke down near a small fishing village.")
    hits = store.search_dense(Scope("t1"), query, 2)
    assert ids(hits) == ["m2", "m1"]
    for hit in hits:
        assert hit.score == pytest.approx(cosine(query, EMB.embed_one(hit.item.text)), abs=1e-5)
    assert not backend.open().multivector  # and it stays so across restarts


def test_no_tenant_or_cube_id_spells_another_tenants_scope_key() -> None:
    triples = [("t1", "c1", "active"), ("t", "1c1", "active"), ("t1c", "1", "active"),
               ("t1", "c1a", "ctive"), ("t1\x1fc1", "", "active"), ("2:t1", "c1", "active"),
               ("t", "12:t1c1", "active"), ("", "t1c1", "active")]
    assert len({scope_key(*t) for t in triples}) == len(triples)


def test_a_server_store_connecting_late_reports_its_layout_on_first_ask() -> None:
    """A store unreachable at start learns its layout when it connects; the service
    asks before its first write reaches upsert, so asking connects too."""
    client = QdrantClient(location=":memory:")
    late = ServerStore(client, embedding_model=EMB.model_id, dim=EMB.dim)
    late._open, late._multivector = False, False  # as __init__ leaves one whose server was down
    assert late.multivector
    assert late._open  # type: ignore[attr-defined]
    client.close()
