"""A store that fails on demand, around a real one: the fault-injection fake.

Tests wrap a real :class:`memory.store.edge.EdgeStore` in it and switch its mode
while the proxy serves: ``down`` fails every call as an unreachable store would
(``ConnectionError``), ``read-only`` fails writes the way a read-only disk does
(``OSError`` EROFS) while reads still work. ``ok`` passes everything through.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from memory.store.base import MemoryStore
from memory.store.wrapper import Kind, WrappedStore

T = TypeVar("T")
Mode = Literal["ok", "down", "read-only"]


class FaultyStore(WrappedStore):
    def __init__(self, inner: MemoryStore, mode: Mode = "ok") -> None:
        super().__init__(inner)
        self.mode: Mode = mode
        self.refused = 0  # calls failed on purpose, so a test can see the fault was hit

    def _call(self, kind: Kind, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.mode == "down":
            self.refused += 1
            raise ConnectionError("injected fault: the memory store is unreachable")
        if kind == "write" and self.mode == "read-only":
            self.refused += 1
            raise OSError(errno.EROFS, "injected fault: Read-only file system")
        return fn(*args, **kwargs)
