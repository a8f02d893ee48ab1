"""Filters: small backend-neutral ``Where`` values, and the builders of every filter a
store uses. Each engine translates a ``Where`` to its own SDK's filter classes.

Every ``Where`` for memory points starts with the tenant condition, or (a search of
given cubes) matches only scope keys that begin with the tenant: isolation lives in
this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from memory.models import MemoryStatus
from memory.store.base import Scope
from memory.store.layout import (
    CUBE_TENANT_FIELD,
    CURRENT_FIELD,
    PINNED_FIELD,
    SCOPE_FIELD,
    TENANT_CURRENT_FIELD,
    TENANT_FIELD,
    TEXT_KEY_FIELD,
    scope_key,
)


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


#: Matches every point.
EVERYTHING = Where(())


def chunks(values: Sequence[str], size: int = 512) -> Iterable[tuple[str, ...]]:
    """Values a few hundred at a time: one filter's worth."""
    for start in range(0, len(values), size):
        yield tuple(values[start:start + size])


# -- memory points ---------------------------------------------------------------------

def tenant_where(tenant: str, *conds: Cond, current: bool | None = None) -> Where:
    must: list[Cond] = [Match(TENANT_FIELD, tenant)]
    if current is not None:
        must.append(Match(CURRENT_FIELD, int(current)))
    return Where(tuple(must) + conds)


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


def ids_where(tenant: str, memory_ids: tuple[str, ...], *, current: bool | None = None) -> Where:
    """Points of these item ids (every version, or the current ones only)."""
    return tenant_where(tenant, MatchIn("id", memory_ids), current=current)


def texts_where(tenant: str, cube_id: str, keys: Sequence[str]) -> Where:
    """Active current items of a cube whose text has one of these keys."""
    return tenant_where(tenant, Match("cube_id", cube_id), Match("status", "active"),
                        MatchIn(TEXT_KEY_FIELD, tuple(keys)), current=True)


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


# -- opening a store --------------------------------------------------------------------

def unkeyed_where(*conds: Cond) -> Where:
    """Current points without search keys: a store's from before them, or written by an
    older replica since; each open gives them their keys. Keys are set through this
    filter, not by point id, so a version superseded meanwhile is not keyed."""
    return Where((Match(CURRENT_FIELD, 1), Missing(SCOPE_FIELD), *conds))


def stale_keyed_where(*conds: Cond) -> Where:
    """Superseded versions that still hold search keys: an older replica (or an older
    release) supersedes a version by clearing ``current`` alone. Each open clears them,
    or recall would find the old text."""
    return Where((Match(CURRENT_FIELD, 0), MatchNot(SCOPE_FIELD, ("",)), *conds))
