"""The embedded store: Qdrant Edge (the Qdrant engine in-process) under a directory.

The store's logic is :class:`memory.store.qdrant.QdrantStore`'s; the shard's layout
(memories, cubes and the metadata record in one shard) is the engine's, see
:mod:`memory.store.engines.edge`. Writes take the engine's lock, so that a multi-step
write (upsert, then settle the current flags) is not interleaved with another.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from memory.store.engines.edge import EdgeEngine
from memory.store.qdrant import QdrantStore


class EdgeStore(QdrantStore[EdgeEngine]):
    def __init__(self, path: Path, *, embedding_model: str, dim: int,
                 also_accept: Collection[str] = ()) -> None:
        """``also_accept``: model ids of a store this embedder can serve (its
        ``same_space``)."""
        self.path = Path(path)
        super().__init__(EdgeEngine(self.path), embedding_model=embedding_model, dim=dim,
                         also_accept=also_accept)

    def optimize(self) -> bool:
        """Build the HNSW index and drop deleted points (done at every open). Edge runs
        no optimizer by itself: until this runs, dense search is a full scan (about
        3-4 ms at 10k items of one tenant, about 1.5 ms after). qdrant-edge-py 0.9 holds
        the GIL throughout (5-8 s at 10k items with their sentence vectors), stalling
        the whole process: never call it from a request path."""
        with self._lock:
            return self.engine.optimize()
