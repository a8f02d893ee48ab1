"""A store that fails on demand, around a real one: the fault-injection fake.

Tests wrap a real :class:`memory.store.edge.EdgeStore` in it and switch its mode
while the proxy serves: ``down`` fails every call as an unreachable store would
(``ConnectionError``), ``read-only`` fails writes the way a read-only disk does
(``OSError`` EROFS) while reads still work. ``ok`` passes everything through.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Literal

from memory.models import Cube, MemoryItem, MemoryStatus
from memory.store.base import Hit, MemoryStore, Scope

Mode = Literal["ok", "down", "read-only"]


class FaultyStore(MemoryStore):
    def __init__(self, inner: MemoryStore, mode: Mode = "ok") -> None:
        self.inner = inner
        self.mode: Mode = mode
        self.embedding_model = inner.embedding_model
        self.dim = inner.dim
        self.refused = 0  # calls failed on purpose, so a test can see the fault was hit

    def _read(self) -> None:
        if self.mode == "down":
            self.refused += 1
            raise ConnectionError("injected fault: the memory store is unreachable")

    def _write(self) -> None:
        self._read()
        if self.mode == "read-only":
            self.refused += 1
            raise OSError(errno.EROFS, "injected fault: Read-only file system")

    @property
    def multivector(self) -> bool:  # a server store learns it when it first connects
        return self.inner.multivector

    @multivector.setter
    def multivector(self, value: bool) -> None:
        self.inner.multivector = value

    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        self._write()
        self.inner.upsert(items, vectors, pieces)

    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        self._read()
        return self.inner.get(tenant, memory_id)

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        self._read()
        return self.inner.history(tenant, memory_id)

    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        self._read()
        return self.inner.list_items(tenant, user=user, cube_id=cube_id, status=status,
                                     limit=limit, cursor=cursor)

    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        self._read()
        return self.inner.block_candidates(tenant, cube_id, limit)

    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        self._read()
        return self.inner.search_dense(scope, vector, limit)

    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        self._read()
        return self.inner.search_sparse(scope, text, limit)

    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        self._read()
        return self.inner.existing_texts(tenant, cube_id, keys)

    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        self._read()
        return self.inner.count(tenant, cube_id=cube_id)

    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        self._write()
        self.inner.touch(tenant, memory_ids, at)

    def purge_user(self, tenant: str, user: str) -> int:
        self._write()
        return self.inner.purge_user(tenant, user)

    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        self._write()
        return self.inner.delete_cube_items(tenant, cube_id)

    def put_cube(self, cube: Cube) -> None:
        self._write()
        self.inner.put_cube(cube)

    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        self._read()
        return self.inner.get_cube(tenant, cube_id)

    def list_cubes(self, tenant: str) -> list[Cube]:
        self._read()
        return self.inner.list_cubes(tenant)

    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        self._write()
        return self.inner.delete_cube(tenant, cube_id)

    def probe(self) -> None:
        self._write()
        self.inner.probe()

    def close(self) -> None:
        self.inner.close()
