"""Retrieval: hybrid search (dense + BM25 sparse) fused by weighted reciprocal rank.

Dense similarity finds paraphrases; BM25 finds rare exact words (names, places).
Each list is ranked by its own store query; fusion uses ranks, not raw scores, since
cosine and BM25 scores live on different scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memory.embedding.base import Embedder
from memory.models import normalise
from memory.store.base import Hit, MemoryStore, Scope


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    # Chosen on LoCoMo (bench/locomo_recall.py): a small rrf_k lets each list's top
    # ranks decide, and BM25 leads since names and rare words carry most questions.
    candidates: int = 20  # from each of dense and sparse, before fusion
    dense_weight: float = 0.7
    sparse_weight: float = 1.0
    rrf_k: int = 10


def fuse(dense: Sequence[Hit], sparse: Sequence[Hit], config: RetrievalConfig) -> list[Hit]:
    scores: dict[str, float] = {}
    items: dict[str, Hit] = {}
    for weight, hits in ((config.dense_weight, dense), (config.sparse_weight, sparse)):
        for rank, hit in enumerate(hits):
            scores[hit.item.id] = scores.get(hit.item.id, 0.0) + weight / (config.rrf_k + rank + 1)
            items.setdefault(hit.item.id, hit)
    ranked = sorted(scores, key=lambda i: scores[i], reverse=True)
    out: list[Hit] = []
    seen_text: set[str] = set()
    for memory_id in ranked:
        hit = items[memory_id]
        key = normalise(hit.item.text)
        if key in seen_text:  # the same words stored twice add nothing to a prompt
            continue
        seen_text.add(key)
        out.append(Hit(item=hit.item, score=scores[memory_id]))
    return out


class Retriever:
    def __init__(self, store: MemoryStore, embedder: Embedder,
                 config: RetrievalConfig | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.config = config or RetrievalConfig()

    def search(self, scope: Scope, query: str, limit: int) -> list[Hit]:
        if not query.strip() or limit <= 0:
            return []
        n = max(self.config.candidates, limit)
        dense = self.store.search_dense(scope, self.embedder.embed_one(query), n)
        sparse = self.store.search_sparse(scope, query, n)
        return fuse(dense, sparse, self.config)[:limit]
