"""Errors the memory layer raises; its callers decide what they mean to theirs (the
proxy maps them in ``proxy.errors.from_memory_error``).

    MemoryLayerError
    ├── InvalidMemoryRequest   bad input
    ├── MemoryNotFound         no such memory or cube for this tenant
    └── MemoryUnavailable      the store or embedder cannot serve now: down, failing, read-only
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


class MemoryUnavailable(MemoryLayerError):
    """Not the request's fault and not a bug: retrying later may succeed. Chat answers
    without memory; the memory API answers 503; write-back waits for the store."""
