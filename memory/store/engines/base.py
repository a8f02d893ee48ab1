"""The engine protocol: what :class:`memory.store.qdrant.QdrantStore` asks of a Qdrant SDK.

An engine stores points and answers filters, nothing more: versions, tenants, scopes
and migrations are the store's. Points and filters pass in neutral form (``Point``,
``where.Where``); each engine translates them to its SDK's classes and back. It holds
two sets of points, the memories and the cubes (``cubes=True``), which may be one and
the same (Edge: one shard) or two (a server: two collections).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from memory.store.layout import IndexKind
from memory.store.where import Where

#: A point's id and payload, as read back.
Record = tuple[str, dict[str, Any]]
#: A search hit's payload and score.
Scored = tuple[dict[str, Any], float]
#: Update a filter's points, or these point ids'.
Target = Where | Sequence[str]


@dataclass(slots=True)
class Point:
    """A point to write: payload-only when it has no vectors (cubes, the probe's)."""

    id: str
    payload: dict[str, Any]
    dense: list[float] | list[list[float]] | None = None
    sparse: tuple[list[int], list[float]] | None = None


class Engine(Protocol):
    @property
    def describe(self) -> str:
        """The store, in messages: "Qdrant Edge store at /data/qdrant"."""

    @property
    def location(self) -> str:
        """Where the store is, in a model mismatch's message."""

    @property
    def write_lock(self) -> AbstractContextManager[Any]:
        """Held around a write of several steps (an upsert, then its settling). An
        engine whose store one process owns serializes them; a server's replicas can
        share no lock, so there it holds nothing and writes settle after the fact."""

    # -- lifecycle -----------------------------------------------------------------

    def open(self, dim: int, record: dict[str, Any]) -> None:
        """Open the store; where there is none yet, create it first, with its vectors
        (``dim``-dim dense multivector, sparse with IDF), the indexes of a new store and
        this metadata record."""

    def metadata(self) -> dict[str, Any] | None:
        """The store's metadata record (``layout.meta``), or None when it has none."""

    def indexed(self) -> Collection[str]:
        """The memory payload fields with an index."""

    def create_index(self, field: str, kind: IndexKind) -> None: ...

    def check_dense(self, dim: int) -> None:
        """Raise StoreError unless the dense vectors have ``dim`` dims, where the engine
        can tell (the metadata record says so already; this catches a store altered by
        hand)."""

    def ready(self) -> None:
        """Finish opening, once the store has accepted the store's checks."""

    def optimize(self) -> bool:
        """Build the search index now where the engine leaves that to its owner;
        whether anything was done."""

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the store did not answer at all (refused, reset, timed
        out), as opposed to answering that something is wrong."""

    # -- points ----------------------------------------------------------------------

    def scroll(self, where: Where, *, fields: Sequence[str] | bool = True, limit: int,
               offset: str | None = None, descending_by: str | None = None,
               cubes: bool = False) -> tuple[list[Record], str | None]:
        """A page of points in id order (or by a field, largest first), and the id the
        next page starts at (None after the last; not given when ordered by a field)."""

    def retrieve(self, ids: Sequence[str], *, payload: bool = True,
                 cubes: bool = False) -> list[Record]: ...

    def upsert(self, points: Sequence[Point], *, cubes: bool = False) -> None: ...

    def set_payload(self, target: Target, payload: dict[str, Any]) -> None:
        """Set these fields on memory points, keeping their other fields."""

    def delete(self, target: Target, *, cubes: bool = False) -> None: ...

    def count(self, where: Where) -> int:
        """Memory points matching (exactly)."""

    def query_dense(self, vector: list[float] | list[list[float]], where: Where,
                    limit: int) -> list[Scored]:
        """Nearest memory points by cosine (MaxSim for a multivector), best first."""

    def query_sparse(self, indices: list[int], values: list[float], where: Where, limit: int,
                     idf_corpus: Where) -> list[Scored]:
        """Best BM25 matches among memory points, IDF measured over ``idf_corpus``."""
