"""Memory stores: one interface, embedded Qdrant Edge (default) and a Qdrant server."""

from memory.store.base import Hit, MemoryStore, Scope, StoreError, StoreMismatchError

__all__ = ["Hit", "MemoryStore", "Scope", "StoreError", "StoreMismatchError"]
