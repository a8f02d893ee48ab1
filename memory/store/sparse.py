"""BM25: the sparse vectors of items and queries, made alike for every backend.

The store makes them from the text with ``qdrant_edge.Bm25`` (whichever backend holds
them), and Qdrant applies IDF at query time, so Edge and a server rank words alike.
"""

from __future__ import annotations

from functools import cache

from qdrant_edge import Bm25, Bm25Config

from memory.models import MemoryItem

# Memory items are a sentence or two, not the 256-token documents BM25's default
# length normalisation assumes; and a long turn is long because it says more, so
# length is only half-normalised (b 0.5, not 0.75). Both measured on LoCoMo.
BM25_AVG_LEN = 24.0
BM25_B = 0.5
#: How much a word of an item's context counts against a word of its own text. A
#: reply ("Yes, I play clarinet!") is often found only through the question it
#: answered; at full weight the question's own words would outrank the answer.
CONTEXT_WEIGHT = 0.5


@cache
def _bm25() -> Bm25:
    return Bm25(Bm25Config(avg_len=BM25_AVG_LEN, b=BM25_B))


def sparse_document(text: str) -> tuple[list[int], list[float]]:
    vec = _bm25().embed_document(text)
    return list(vec.indices), list(vec.values)


def sparse_item(item: MemoryItem) -> tuple[list[int], list[float]]:
    """An item's BM25 document: its text, plus its context at ``CONTEXT_WEIGHT``. Each
    part keeps its own length normalisation, so a long context cannot drown the text."""
    indices, values = sparse_document(item.text)
    if not item.context:
        return indices, values
    weights = dict(zip(indices, values, strict=True))
    for index, value in zip(*sparse_document(item.context), strict=True):
        weights[index] = weights.get(index, 0.0) + CONTEXT_WEIGHT * value
    return list(weights), list(weights.values())


def sparse_query(text: str) -> tuple[list[int], list[float]]:
    vec = _bm25().embed_query(text)
    return list(vec.indices), list(vec.values)
