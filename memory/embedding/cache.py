"""Vectors of recently embedded texts, kept so that no text is embedded twice in a row.

Fast write-back stores the user's turn as it was said, and recall has just embedded
that same turn as its query: with this cache the memory takes the query's vector
instead of a second pass through the model (MiniLM: one embedding of CPU per request;
an embeddings API: one call, and its bill). A question asked again is free too.

Vectors are kept as float32 arrays (1.5 KB for MiniLM's 384 dimensions, where a list
of Python floats takes 12 KB), in an LRU bounded in entries; every caller gets a list
of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from cachetools import LRUCache

from memory.embedding.base import Embedder

#: Texts kept: enough for every turn between its recall and its write-back under load
#: (the outbox's backlog stays in the tens), at about 6 MB for MiniLM.
DEFAULT_ENTRIES = 4096


class CachingEmbedder(Embedder):
    """``inner``'s vectors, each text embedded once while it stays among the recent."""

    def __init__(self, inner: Embedder, entries: int = DEFAULT_ENTRIES) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.same_space = inner.same_space
        self._vectors: LRUCache[str, np.ndarray] = LRUCache(maxsize=entries)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        found: list[np.ndarray | None] = []
        with self._lock:
            for text in texts:
                found.append(self._vectors.get(text))
        missing = list(dict.fromkeys(t for t, v in zip(texts, found, strict=True) if v is None))
        if missing:
            fresh = dict(zip(missing, (np.asarray(v, dtype=np.float32)
                                       for v in self.inner.embed(missing)), strict=True))
            with self._lock:
                self._vectors.update(fresh)
            found = [v if v is not None else fresh[t] for t, v in zip(texts, found, strict=True)]
        with self._lock:
            self.misses += len(missing)
            self.hits += len(texts) - len(missing)
        return [v.tolist() for v in found if v is not None]

    def probe(self) -> None:
        self.inner.probe()  # the model itself: a cached text would prove nothing

    def close(self) -> None:
        self.inner.close()
