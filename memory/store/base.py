"""The store interface. Every read and write is scoped by tenant: isolation is
enforced here, in the store layer, not by callers remembering to filter.

A store keeps every version of every item as its own point (``item.point_id``);
exactly one version per item id is *current*. Searches and listings see current
versions only; ``history`` sees them all.

Dense vectors come from the caller (its embedder); sparse BM25 vectors are made by
the store from the text with ``qdrant_edge.Bm25``, IDF applied by Qdrant, so every
backend ranks words alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from memory.models import Cube, MemoryItem, MemoryStatus

# Not a valid tenant id (settings require a leading letter or digit), so a probe can
# never read or touch a real tenant's records.
_PROBE_TENANT = "~probe"


class StoreError(Exception):
    """The store cannot serve (unreachable, corrupt, misconfigured)."""


class StoreMismatchError(StoreError):
    """The collection was built with another embedding model or dimension."""


class StoreUnavailable(StoreError):
    """The store is not open: still connecting, or an attempt failed moments ago and the
    next one is not due yet. Retrying later may succeed."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Which items a search may see."""

    tenant: str
    cube_ids: Sequence[str] | None = None  # None: every cube of the tenant
    user: str | None = None
    statuses: Sequence[MemoryStatus] = ("active",)


@dataclass(frozen=True, slots=True)
class Hit:
    item: MemoryItem
    score: float


class MemoryStore(ABC):
    #: Embedding model id and dimension the store was opened with.
    embedding_model: str
    dim: int
    #: Whether an item with sentence pieces (``memory.pieces``) is stored with a vector
    #: per piece, in place of its whole text's, and dense search scores it by the best.
    #: Stores created before pieces existed hold one vector per item, and ignore pieces.
    multivector: bool = False

    @abstractmethod
    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        """Write these versions (idempotent: same point id, same result). Each becomes the
        current version of its item id unless a higher version is already stored (a
        replayed old write never rolls an item back); other versions stay, for history.
        ``pieces``: per item, the vectors of its sentence pieces (kept where
        ``multivector``)."""

    @abstractmethod
    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        """The current version, or None (also when it belongs to another tenant)."""

    @abstractmethod
    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        """Every version, oldest first."""

    @abstractmethod
    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        """Current versions in a stable order, a page at a time; the cursor of the next
        page, or None after the last. A malformed cursor raises ValueError."""

    @abstractmethod
    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        """What a cube's activation block is chosen from, without reading the whole
        cube: its active pinned items and its ``limit`` most accessed active items
        (each at most ``limit``; in any order, without duplicates)."""

    @abstractmethod
    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        """Nearest current items by cosine similarity (of their best piece, where
        ``multivector``), best first."""

    @abstractmethod
    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        """Best BM25 matches among current items, best first."""

    @abstractmethod
    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        """Which of these ``models.text_key`` values an active current item of the cube
        has (exact duplicates, up to case and spacing). Items written before the store
        recorded text keys are not seen."""

    @abstractmethod
    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        """Current items (any status)."""

    @abstractmethod
    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        """Count an access (access_count + 1, last_accessed_at) without a new version."""

    @abstractmethod
    def purge_user(self, tenant: str, user: str) -> int:
        """Erase every version of every item of a user (erasure requests). Returns items."""

    @abstractmethod
    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        """Erase every version of every item in a cube. Returns items."""

    @abstractmethod
    def put_cube(self, cube: Cube) -> None: ...

    @abstractmethod
    def get_cube(self, tenant: str, cube_id: str) -> Cube | None: ...

    @abstractmethod
    def list_cubes(self, tenant: str) -> list[Cube]: ...

    @abstractmethod
    def delete_cube(self, tenant: str, cube_id: str) -> bool: ...

    def probe(self) -> None:
        """Raise unless the store can serve reads and writes now: the write-back worker
        calls it to tell a store outage from a bad item. This default reads only; stores
        that can refuse writes alone (a read-only disk, a read-only replica) override it
        with a small idempotent write."""
        self.get_cube(_PROBE_TENANT, "probe")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release."""
