"""Errors the memory layer raises for its callers to map (the proxy: 400 and 404).

    MemoryLayerError
    ├── InvalidMemoryRequest   bad input (400)
    └── MemoryNotFound         no such memory or cube for this tenant (404)
"""

from __future__ import annotations


class MemoryLayerError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidMemoryRequest(MemoryLayerError):
    pass


class MemoryNotFound(MemoryLayerError):
    pass
