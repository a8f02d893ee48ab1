"""The embedder interface, and a deterministic fake for unit tests."""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence


class Embedder(ABC):
    """Sync (callers run it off the event loop); returns L2-normalised vectors."""

    #: Names the model and its settings; a store built with one refuses another.
    model_id: str
    dim: int
    #: Other model ids whose vectors are interchangeable with this one's (the same
    #: weights at another precision): a store built with one of them is accepted.
    same_space: frozenset[str] = frozenset()

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order."""

    def embed_one(self, text: str) -> list[float]:
        return self.embed([text])[0]

    def probe(self) -> None:
        """Raise when the embedder cannot serve now; return when it can.

        The write-back worker asks before it holds a failure against an exchange, and
        again until an outage ends. By default one short text is embedded.
        """
        self.embed(["probe"])

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""


class HashEmbedder(Embedder):
    """Deterministic bag-of-words hashing: texts sharing words have nearby vectors.

    For unit tests only; it knows nothing of meaning.
    """

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.model_id = f"hash-{dim}"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._one(t) for t in texts]

    def _one(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
            vec[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]
