"""One meaning for a store failure: :class:`memory.errors.MemoryUnavailable`.

Each backend fails its own way: Qdrant Edge's binding raises bare ``Exception``,
qdrant-client raises its HTTP and gRPC errors, a full or read-only disk raises
``OSError``. Callers should not have to know which: chat answers without memory,
the memory API answers 503, and the write-back worker waits for the store instead
of counting the failure against the exchange. So every call goes through this
wrapper, which lets programming errors and bad arguments through as they are
(a cursor that does not parse is the caller's ``ValueError``; a bug stays a bug)
and turns everything else into ``MemoryUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from memory.errors import MemoryLayerError, MemoryUnavailable
from memory.models import Cube, MemoryItem, MemoryStatus
from memory.store.base import Hit, MemoryStore, Scope

log = logging.getLogger(__name__)

T = TypeVar("T")

# Raised by our own code for bad input or bugs, never by a store being unable to serve.
_NOT_OUTAGES = (MemoryLayerError, ValueError, TypeError, LookupError, AttributeError,
                AssertionError, NotImplementedError)


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, _NOT_OUTAGES)


class GuardedStore(MemoryStore):
    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.embedding_model = inner.embedding_model
        self.dim = inner.dim

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except MemoryUnavailable:
            raise
        except Exception as exc:
            if not is_outage(exc):
                raise
            # The message names the failure's type only: store errors can quote payloads.
            raise MemoryUnavailable(
                f"The memory store is unavailable ({type(exc).__name__}); "
                "try again later.") from exc

    def __getattr__(self, name: str) -> Any:
        # Backend extras (EdgeStore.optimize) stay reachable, unguarded.
        return getattr(self.inner, name)

    @property
    def multivector(self) -> bool:  # a server store learns it when it first connects
        return self.inner.multivector

    @multivector.setter
    def multivector(self, value: bool) -> None:
        self.inner.multivector = value

    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        self._call(self.inner.upsert, items, vectors, pieces)

    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        return self._call(self.inner.get, tenant, memory_id)

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        return self._call(self.inner.history, tenant, memory_id)

    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        return self._call(self.inner.list_items, tenant, user=user, cube_id=cube_id,
                          status=status, limit=limit, cursor=cursor)

    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        return self._call(self.inner.block_candidates, tenant, cube_id, limit)

    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        return self._call(self.inner.search_dense, scope, vector, limit)

    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        return self._call(self.inner.search_sparse, scope, text, limit)

    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        return self._call(self.inner.existing_texts, tenant, cube_id, keys)

    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        return self._call(self.inner.count, tenant, cube_id=cube_id)

    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        self._call(self.inner.touch, tenant, memory_ids, at)

    def purge_user(self, tenant: str, user: str) -> int:
        return self._call(self.inner.purge_user, tenant, user)

    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        return self._call(self.inner.delete_cube_items, tenant, cube_id)

    def put_cube(self, cube: Cube) -> None:
        self._call(self.inner.put_cube, cube)

    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        return self._call(self.inner.get_cube, tenant, cube_id)

    def list_cubes(self, tenant: str) -> list[Cube]:
        return self._call(self.inner.list_cubes, tenant)

    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        return self._call(self.inner.delete_cube, tenant, cube_id)

    def probe(self) -> None:
        self._call(self.inner.probe)

    def close(self) -> None:
        self.inner.close()
