"""A store around another: every call goes through one hook, ``_call``.

:class:`memory.store.guard.GuardedStore` gives store failures one meaning there, and
the fault-injection fake (:class:`memory.store.faulty.FaultyStore`) fails on demand
there; neither needs to repeat the store's methods. The hook learns whether a call
reads or writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from memory.models import Cube, MemoryItem, MemoryStatus
from memory.store.base import Hit, MemoryStore, Scope

T = TypeVar("T")
Kind = Literal["read", "write"]


class WrappedStore(MemoryStore):
    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.embedding_model = inner.embedding_model
        self.dim = inner.dim

    def _call(self, kind: Kind, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    @property
    def multivector(self) -> bool:  # a server store learns it when it first connects
        return self.inner.multivector

    @multivector.setter
    def multivector(self, value: bool) -> None:
        self.inner.multivector = value

    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        self._call("write", self.inner.upsert, items, vectors, pieces)

    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        return self._call("read", self.inner.get, tenant, memory_id)

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        return self._call("read", self.inner.history, tenant, memory_id)

    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        return self._call("read", self.inner.list_items, tenant, user=user, cube_id=cube_id,
                          status=status, limit=limit, cursor=cursor)

    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        return self._call("read", self.inner.block_candidates, tenant, cube_id, limit)

    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        return self._call("read", self.inner.search_dense, scope, vector, limit)

    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        return self._call("read", self.inner.search_sparse, scope, text, limit)

    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        return self._call("read", self.inner.existing_texts, tenant, cube_id, keys)

    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        return self._call("read", self.inner.count, tenant, cube_id=cube_id)

    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        self._call("write", self.inner.touch, tenant, memory_ids, at)

    def purge_user(self, tenant: str, user: str) -> int:
        return self._call("write", self.inner.purge_user, tenant, user)

    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        return self._call("write", self.inner.delete_cube_items, tenant, cube_id)

    def put_cube(self, cube: Cube) -> None:
        self._call("write", self.inner.put_cube, cube)

    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        return self._call("read", self.inner.get_cube, tenant, cube_id)

    def list_cubes(self, tenant: str) -> list[Cube]:
        return self._call("read", self.inner.list_cubes, tenant)

    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        return self._call("write", self.inner.delete_cube, tenant, cube_id)

    def probe(self) -> None:
        self._call("write", self.inner.probe)

    def close(self) -> None:
        self.inner.close()
