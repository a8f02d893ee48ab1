"""The point layout every Qdrant-backed store shares: fields, payloads, ids, cursors.

Both backends store the same points, so a store moved from Qdrant Edge to a Qdrant
server (or compared with one in the congruence tests) behaves alike:

- one point per version of an item, id ``item.point_id``, named vectors ``dense``
  (cosine; since schema 2 a multivector scored by MaxSim: one vector per sentence
  piece, see ``memory.pieces``, or the text's own for a single sentence) and ``bm25``
  (sparse, IDF applied by Qdrant; see ``memory.store.sparse``);
- payload: every ``MemoryItem`` field at the top level, plus ``current``: 1 on the
  current version, 0 on the others. An integer, not a bool: qdrant-edge-py 0.9 reads
  ``MatchValue(True)`` as the integer 1, which matches no stored ``true``;
- cubes: payload-only points ``{"cube": {...Cube fields}}``, id from tenant and cube id;
- a metadata record naming the embedding model and dimension the store was built for.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

from memory.models import Cube, MemoryItem, stable_id, text_key
from memory.store.base import Hit, StoreMismatchError
from memory.store.sparse import BM25_AVG_LEN, BM25_B, CONTEXT_WEIGHT

DENSE = "dense"
SPARSE = "bm25"
#: 1: ``dense`` holds one vector per item; 2: a multivector (its pieces, or the text's).
SCHEMA = 2
MULTIVECTOR_SCHEMA = 2
META_KEY = "memcube_store"
#: The point a store's probe writes (a health check's small write): payload only, so
#: no memory or cube filter can match it.
PROBE_ID = stable_id("memcube-store-probe")

#: Payload fields with an index: every memory filter uses some of them.
#: ``models.text_key`` of the item's text: exact duplicates by one index lookup.
TEXT_KEY_FIELD = "text_key"
#: A current item's tenant, cube and status in one keyword (``scope_key``); "" on
#: other versions. A search of some cubes is then one condition, not four: Qdrant
#: checks a filter of several conditions point by point, which took 3-4 ms of a 6 ms
#: dense search over 10k points not yet indexed, where one indexed condition reads
#: its postings (0 ms more than no filter at all).
SCOPE_FIELD = "scope_key"
#: A current item's tenant; "" on other versions: the corpus BM25's IDF is measured
#: over, as one condition (about 1.5 ms less per sparse search at 10k than two).
TENANT_CURRENT_FIELD = "tenant_current"
KEYWORD_INDEXES = ("id", "cube_id", "user", "status", TEXT_KEY_FIELD, SCOPE_FIELD,
                   TENANT_CURRENT_FIELD)
#: Fields a store from before them gets on its current items when opened.
SCOPE_FIELDS = (SCOPE_FIELD, TENANT_CURRENT_FIELD)
TENANT_FIELD = "tenant"
CURRENT_FIELD = "current"
UNFLAG: dict[str, Any] = {CURRENT_FIELD: 0, SCOPE_FIELD: "", TENANT_CURRENT_FIELD: ""}
CUBE_TENANT_FIELD = "cube.tenant"
#: Integer-indexed (with ranges), so the most accessed items come ordered from the store.
ACCESS_FIELD = "access_count"
#: ``pinned`` as 0/1: Qdrant Edge's Python binding cannot match a boolean payload value.
PINNED_FIELD = "pinned_flag"

#: How a field is indexed: a keyword; the keyword that partitions by tenant; an integer
#: matched by value (``lookup``) or read in order (``range``).
IndexKind = Literal["tenant", "keyword", "lookup", "range"]
Indexes = tuple[tuple[str, IndexKind], ...]
#: The memory points' indexes of a new store.
MEMORY_INDEXES: Indexes = ((TENANT_FIELD, "tenant"), (CURRENT_FIELD, "lookup"),
                           (ACCESS_FIELD, "range"), (PINNED_FIELD, "lookup"),
                           *((key, "keyword") for key in KEYWORD_INDEXES))
CUBE_INDEXES: Indexes = ((CUBE_TENANT_FIELD, "keyword"),)
#: Indexes later releases added: a store from before one gets it when opened.
LATER_INDEXES: Indexes = ((TEXT_KEY_FIELD, "keyword"), (ACCESS_FIELD, "range"),
                          (PINNED_FIELD, "lookup"), *((key, "keyword") for key in SCOPE_FIELDS))

_ITEM_FIELDS = tuple(MemoryItem.model_fields)
_CURSOR_PREFIX = "p1:"


def scope_key(tenant: str, cube_id: str, status: str) -> str:
    """Length-prefixed, so no tenant or cube id, whatever its characters, can spell
    another tenant's key."""
    return f"{len(tenant)}:{tenant}{len(cube_id)}:{cube_id}{status}"


def scope_fields(tenant: str, cube_id: str, status: str) -> dict[str, Any]:
    return {SCOPE_FIELD: scope_key(tenant, cube_id, status), TENANT_CURRENT_FIELD: tenant}


# -- memory points -------------------------------------------------------------------

def item_payload(item: MemoryItem, *, current: bool) -> dict[str, Any]:
    payload = item.model_dump(mode="json")
    payload[TEXT_KEY_FIELD] = text_key(item.text)
    payload[PINNED_FIELD] = int(item.pinned)
    payload |= scope_fields(item.tenant, item.cube_id, item.status) if current else UNFLAG
    payload[CURRENT_FIELD] = int(current)
    return payload


def payload_item(payload: dict[str, Any]) -> MemoryItem:
    return MemoryItem.model_validate({k: payload[k] for k in _ITEM_FIELDS if k in payload})


def unique_items(payloads: Iterable[dict[str, Any]]) -> list[MemoryItem]:
    seen: set[str] = set()
    out: list[MemoryItem] = []
    for payload in payloads:
        item = payload_item(payload)
        if item.id not in seen:
            seen.add(item.id)
            out.append(item)
    return out


def ranked(hits: list[Hit]) -> list[Hit]:
    """Best first; equal scores by item id, so ties come out alike from every backend."""
    return sorted(hits, key=lambda h: (-h.score, h.item.id))


def scope_groups(found: Iterable[tuple[str, dict[str, Any]]]
                 ) -> list[tuple[list[str], dict[str, Any]]]:
    """Current points grouped by the ``SCOPE_FIELDS`` their payload gives (tenant,
    cube_id, status), with those fields: what a store from before them sets."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for pid, p in found:
        if "tenant" in p and "cube_id" in p and "status" in p:
            fields = scope_fields(p["tenant"], p["cube_id"], p["status"])
            groups.setdefault(fields[SCOPE_FIELD], ([], fields))[0].append(pid)
    return list(groups.values())


# -- versions and access counts ---------------------------------------------------------

def batch_currents(items: Sequence[MemoryItem]) -> list[bool]:
    """Which items of an upsert batch are written as current: the highest version of
    each item id in the batch (the store then settles against versions already stored)."""
    best: dict[tuple[str, str], int] = {}
    for item in items:
        key = (item.tenant, item.id)
        best[key] = max(best.get(key, item.version), item.version)
    return [best[(i.tenant, i.id)] == i.version for i in items]


def stale_currents(currents: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """Point ids to unflag, given the (point id, payload) of every point flagged
    current for some item ids: all but the highest version of each item.

    The highest version stored wins, whatever order writes land in: replaying an old
    version after a newer one, or two writers racing, can't leave two current
    versions or none once each writer has settled.
    """
    best: dict[str, tuple[int, str]] = {}
    stale: list[str] = []
    for pid, payload in currents:
        mine = (int(payload["version"]), pid)
        held = best.get(payload["id"])
        if held is None:
            best[payload["id"]] = mine
        else:
            stale.append(min(held, mine)[1])
            best[payload["id"]] = max(held, mine)
    return stale


def touch_groups(found: Iterable[tuple[str, dict[str, Any]]], times: Counter[str],
                 at: int) -> list[tuple[list[str], dict[str, Any]]]:
    """The points of a touch grouped by their new counts: one payload update per group,
    not per point (a recall's items are often at the same count)."""
    groups: dict[int, tuple[list[str], dict[str, Any]]] = {}
    for pid, payload in found:
        count = int(payload.get("access_count") or 0) + times[payload["id"]]
        groups.setdefault(count, ([], {"access_count": count, "last_accessed_at": at}))[0].append(pid)
    return list(groups.values())


# -- cubes ---------------------------------------------------------------------------

def cube_point_id(tenant: str, cube_id: str) -> str:
    return stable_id("cube-record", tenant, cube_id)


def cube_payload(cube: Cube) -> dict[str, Any]:
    return {"cube": cube.model_dump(mode="json")}


def payload_cube(payload: dict[str, Any]) -> Cube:
    return Cube.model_validate(payload["cube"])


# -- model and dimension ------------------------------------------------------------

def meta(embedding_model: str, dim: int) -> dict[str, Any]:
    return {"embedding_model": embedding_model, "dim": dim, "schema": SCHEMA,
            "bm25_avg_len": BM25_AVG_LEN, "bm25_b": BM25_B, "context_weight": CONTEXT_WEIGHT}


def check_meta(found: dict[str, Any] | None, embedding_model: str, dim: int, where: str,
               also_accept: Collection[str] = ()) -> None:
    """Refuse a store built for another embedder: its vectors would be meaningless."""
    if not found or "embedding_model" not in found or "dim" not in found:
        raise StoreMismatchError(
            f"store at {where} records no embedding model: it was not created by MemCube "
            f"Proxy, or is damaged; point the proxy at another location")
    model_ok = found["embedding_model"] == embedding_model or found["embedding_model"] in also_accept
    if not model_ok or int(found["dim"]) != dim:
        raise StoreMismatchError(
            f"store at {where} was built with model {found['embedding_model']} "
            f"({found['dim']} dims); this proxy is configured with {embedding_model} ({dim} dims). "
            f"Configure the original embedding model, or give this one a new store location")


def is_multivector(found: dict[str, Any]) -> bool:
    """Whether a store with this metadata record keeps pieces (see ``SCHEMA``)."""
    return int(found.get("schema", 1)) >= MULTIVECTOR_SCHEMA


# -- dense values ----------------------------------------------------------------------

def dense_value(vector: Sequence[float], pieces: Sequence[Sequence[float]] | None, dim: int,
                multivector: bool) -> list[float] | list[list[float]]:
    """What an item's ``dense`` vector is: its own vector, or its pieces' where the
    store keeps them and it has any."""
    whole = check_vector(vector, dim)
    if not multivector:
        return whole
    return [check_vector(p, dim) for p in pieces] if pieces else [whole]


def dense_query(vector: Sequence[float], dim: int,
                multivector: bool) -> list[float] | list[list[float]]:
    query = check_vector(vector, dim)
    return [query] if multivector else query


def check_pieces(items: Sequence[Any], vectors: Sequence[Any],
                 pieces: Sequence[Any] | None) -> Sequence[Any]:
    if len(items) != len(vectors):
        raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
    if pieces is None:
        return [None] * len(items)
    if len(pieces) != len(items):
        raise ValueError(f"{len(items)} items but {len(pieces)} piece lists")
    return pieces


def check_vector(vector: Sequence[float], dim: int) -> list[float]:
    if len(vector) != dim:
        raise StoreMismatchError(f"vector has {len(vector)} dims; the store holds {dim}-dim vectors")
    if isinstance(vector, list):
        return vector  # the common case; copying 10k x 384 floats costs 0.15 s
    tolist = getattr(vector, "tolist", None)  # numpy, without importing it
    return list(tolist()) if tolist else [float(v) for v in vector]


# -- cursors -------------------------------------------------------------------------

def encode_cursor(pid: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + pid).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The point id a page starts at (Qdrant's scroll order: by point id)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(_CURSOR_PREFIX):
            raise ValueError(cursor)
        return str(uuid.UUID(raw[len(_CURSOR_PREFIX):]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"invalid cursor: {cursor!r}") from None
