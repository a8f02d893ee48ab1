"""What the Qdrant-backed stores share: the point layout, filters, cursors, BM25.

Both backends store the same points, so a store moved from Qdrant Edge to a Qdrant
server (or compared with one in the congruence tests) behaves alike:

- one point per version of an item, id ``point_id(item)``, named vectors ``dense``
  (cosine; since schema 2 a multivector scored by MaxSim: one vector per sentence
  piece, see ``memory.pieces``, or the text's own for a single sentence) and ``bm25``
  (sparse, IDF applied by Qdrant);
- payload: every ``MemoryItem`` field at the top level, plus ``current``: 1 on the
  current version, 0 on the others. An integer, not a bool: qdrant-edge-py 0.9 reads
  ``MatchValue(True)`` as the integer 1, which matches no stored ``true``;
- cubes: payload-only points ``{"cube": {...Cube fields}}``, id from tenant and cube id.

Filters are built here once, as small backend-neutral ``Where`` values that each
backend translates to its own filter classes. Every ``Where`` for memory points
starts with the tenant condition, or (a search of given cubes) matches only scope
keys that begin with the tenant: isolation lives in this module.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from qdrant_edge import Bm25, Bm25Config

from memory.models import Cube, MemoryItem, MemoryStatus, stable_id, text_key
from memory.store.base import Hit, Scope, StoreMismatchError

DENSE = "dense"
SPARSE = "bm25"
#: 1: ``dense`` holds one vector per item; 2: a multivector (its pieces, or the text's).
SCHEMA = 2
MULTIVECTOR_SCHEMA = 2
META_KEY = "memcube_store"
#: The point a store's probe writes (a health check's small write).
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

# Memory items are a sentence or two, not the 256-token documents BM25's default
# length normalisation assumes; and a long turn is long because it says more, so
# length is only half-normalised (b 0.5, not 0.75). Both measured on LoCoMo.
BM25_AVG_LEN = 24.0
BM25_B = 0.5
#: How much a word of an item's context counts against a word of its own text. A
#: reply ("Yes, I play clarinet!") is often found only through the question it
#: answered; at full weight the question's own words would outrank the answer.
CONTEXT_WEIGHT = 0.5

_ITEM_FIELDS = tuple(MemoryItem.model_fields)
_CURSOR_PREFIX = "p1:"


# -- filters ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Match:
    key: str
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class MatchIn:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HasIds:
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Missing:
    """The field is absent (or null, or an empty list)."""

    key: str


@dataclass(frozen=True, slots=True)
class MatchNot:
    """The field holds none of these values."""

    key: str
    values: tuple[str, ...]


Cond = Match | MatchIn | HasIds | Missing | MatchNot


@dataclass(frozen=True, slots=True)
class Where:
    """Every condition must hold."""

    must: tuple[Cond, ...]


def tenant_where(tenant: str, *conds: Cond, current: bool | None = None) -> Where:
    must: list[Cond] = [Match(TENANT_FIELD, tenant)]
    if current is not None:
        must.append(Match(CURRENT_FIELD, int(current)))
    return Where(tuple(must) + conds)


def scope_key(tenant: str, cube_id: str, status: str) -> str:
    """Length-prefixed, so no tenant or cube id, whatever its characters, can spell
    another tenant's key."""
    return f"{len(tenant)}:{tenant}{len(cube_id)}:{cube_id}{status}"


def scope_where(scope: Scope) -> Where | None:
    """The filter of a search, or None when the scope can see nothing at all."""
    if not scope.statuses or (scope.cube_ids is not None and not scope.cube_ids):
        return None
    if scope.cube_ids is not None and scope.user is None:  # recall's scope: one condition
        return Where((MatchIn(SCOPE_FIELD, tuple(
            scope_key(scope.tenant, cube, status)
            for cube in scope.cube_ids for status in scope.statuses)),))
    conds: list[Cond] = [MatchIn("status", tuple(scope.statuses))]
    if scope.cube_ids is not None:
        conds.append(MatchIn("cube_id", tuple(scope.cube_ids)))
    if scope.user is not None:
        conds.append(Match("user", scope.user))
    return tenant_where(scope.tenant, *conds, current=True)


def list_where(tenant: str, user: str | None, cube_id: str | None,
               status: MemoryStatus | None) -> Where:
    conds: list[Cond] = []
    if user is not None:
        conds.append(Match("user", user))
    if cube_id is not None:
        conds.append(Match("cube_id", cube_id))
    if status is not None:
        conds.append(Match("status", status))
    return tenant_where(tenant, *conds, current=True)


def texts_where(tenant: str, cube_id: str, keys: Sequence[str]) -> Where:
    """Active current items of a cube whose text has one of these keys."""
    return tenant_where(tenant, Match("cube_id", cube_id), Match("status", "active"),
                        MatchIn(TEXT_KEY_FIELD, tuple(keys)), current=True)


#: Integer-indexed (with ranges), so the most accessed items come ordered from the store.
ACCESS_FIELD = "access_count"
#: ``pinned`` as 0/1: Qdrant Edge's Python binding cannot match a boolean payload value.
PINNED_FIELD = "pinned_flag"


def pinned_where(tenant: str, cube_id: str) -> Where:
    """Active current items of a cube that are pinned (an activation block's first part)."""
    return tenant_where(tenant, Match("cube_id", cube_id), Match("status", "active"),
                        Match(PINNED_FIELD, 1), current=True)


def active_where(tenant: str, cube_id: str) -> Where:
    return tenant_where(tenant, Match("cube_id", cube_id), Match("status", "active"), current=True)


def idf_corpus(tenant: str) -> Where:
    """IDF is measured over the tenant's current items: other tenants' words and
    superseded versions must not move a tenant's ranking. (Statistics only: the
    tenant's key is the tenant itself.)"""
    return Where((Match(TENANT_CURRENT_FIELD, tenant),))


def cube_where(tenant: str) -> Where:
    return Where((Match(CUBE_TENANT_FIELD, tenant),))


def chunks(values: Sequence[str], size: int = 512) -> Iterable[tuple[str, ...]]:
    for start in range(0, len(values), size):
        yield tuple(values[start:start + size])


# -- points ----------------------------------------------------------------------

def point_id(item: MemoryItem) -> str:
    """A version's point id (tenant, id and version: see ``version_point_id``)."""
    return item.point_id


def item_payload(item: MemoryItem, *, current: bool) -> dict[str, Any]:
    payload = item.model_dump(mode="json")
    payload[TEXT_KEY_FIELD] = text_key(item.text)
    payload[PINNED_FIELD] = int(item.pinned)
    payload |= scope_fields(item.tenant, item.cube_id, item.status) if current else UNFLAG
    payload[CURRENT_FIELD] = int(current)
    return payload


def scope_fields(tenant: str, cube_id: str, status: str) -> dict[str, Any]:
    return {SCOPE_FIELD: scope_key(tenant, cube_id, status), TENANT_CURRENT_FIELD: tenant}


def unkeyed_where(*conds: Cond) -> Where:
    """Current points without search keys: a store's from before them, or written by an
    older replica since; each open gives them their keys. Keys are set through this
    filter, not by point id, so a version superseded meanwhile is not keyed."""
    return Where((Match(CURRENT_FIELD, 1), Missing(SCOPE_FIELD), *conds))


def stale_keyed_where() -> Where:
    """Superseded versions that still hold search keys: an older replica (or an older
    release) supersedes a version by clearing ``current`` alone. Each open clears them,
    or recall would find the old text."""
    return Where((Match(CURRENT_FIELD, 0), MatchNot(SCOPE_FIELD, ("",))))


def scope_groups(found: Iterable[tuple[str, dict[str, Any]]]
                 ) -> list[tuple[list[str], dict[str, Any]]]:
    """Current points grouped by the ``SCOPE_FIELDS`` their payload gives (tenant,
    cube_id, status), with those fields: what a store from before them sets."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for point_id, p in found:
        if "tenant" in p and "cube_id" in p and "status" in p:
            fields = scope_fields(p["tenant"], p["cube_id"], p["status"])
            groups.setdefault(fields[SCOPE_FIELD], ([], fields))[0].append(point_id)
    return list(groups.values())


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
    for point_id, payload in currents:
        mine = (int(payload["version"]), point_id)
        held = best.get(payload["id"])
        if held is None:
            best[payload["id"]] = mine
        else:
            stale.append(min(held, mine)[1])
            best[payload["id"]] = max(held, mine)
    return stale


def ranked(hits: list[Hit]) -> list[Hit]:
    """Best first; equal scores by item id, so ties come out alike from every backend."""
    return sorted(hits, key=lambda h: (-h.score, h.item.id))


def touched(payload: dict[str, Any], times: int, at: int) -> dict[str, Any]:
    return {"access_count": int(payload.get("access_count") or 0) + times, "last_accessed_at": at}


def touch_groups(found: Iterable[tuple[str, dict[str, Any]]], times: Counter[str],
                 at: int) -> list[tuple[list[str], dict[str, Any]]]:
    """The points of a touch grouped by their new counts: one payload update per group,
    not per point (a recall's items are often at the same count)."""
    groups: dict[int, tuple[list[str], dict[str, Any]]] = {}
    for point_id, payload in found:
        new = touched(payload, times[payload["id"]], at)
        groups.setdefault(new["access_count"], ([], new))[0].append(point_id)
    return list(groups.values())


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

def encode_cursor(point_id: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + point_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The point id a page starts at (Qdrant's scroll order: by point id)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(_CURSOR_PREFIX):
            raise ValueError(cursor)
        return str(uuid.UUID(raw[len(_CURSOR_PREFIX):]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"invalid cursor: {cursor!r}") from None


# -- BM25 ----------------------------------------------------------------------------

@cache
def _bm25() -> Bm25:
    return Bm25(Bm25Config(avg_len=BM25_AVG_LEN, b=BM25_B))


def sparse_document(text: str) -> tuple[list[int], list[float]]:
    vec = _bm25().embed_document(text)
    return list(vec.indices), list(vec.values)


def sparse_item(item: MemoryItem) -> tuple[list[int], list[float]]:
    """An item's BM25 document: its text, plus its context at ``CONTEXT_WEIGHT``. Each
    part keeps its own length normalisation, so a long context cannot drown the text."""
    indices, values = sparse_document(item.text)
    if not item.context:
        return indices, values
    weights = dict(zip(indices, values, strict=True))
    for index, value in zip(*sparse_document(item.context), strict=True):
        weights[index] = weights.get(index, 0.0) + CONTEXT_WEIGHT * value
    return list(weights), list(weights.values())


def sparse_query(text: str) -> tuple[list[int], list[float]]:
    vec = _bm25().embed_query(text)
    return list(vec.indices), list(vec.values)
