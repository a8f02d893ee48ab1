"""Memory stores: one interface, embedded Qdrant Edge (default) and a Qdrant server."""

from __future__ import annotations

from memory.store.base import (
    Hit,
    MemoryStore,
    Scope,
    StoreError,
    StoreMismatchError,
    StoreUnavailable,
)

__all__ = ["Hit", "MemoryStore", "Scope", "StoreError", "StoreMismatchError", "StoreUnavailable"]
