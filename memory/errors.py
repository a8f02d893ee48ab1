"""Errors the memory layer raises for its callers to map (the proxy: 400, 404, 503).

    MemoryLayerError
    ├── InvalidMemoryRequest   bad input (400)
    ├── MemoryNotFound         no such memory or cube for this tenant (404)
    └── MemoryUnavailable      the store cannot serve now: down, failing, read-only (503)
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

    status = 503
    type = "api_error"
    code = "memory_unavailable"
