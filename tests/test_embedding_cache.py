"""The vectors of recent texts: a turn embedded as the recall query is not embedded
again when fast write-back stores it, and a repeated text costs no model call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from memory.embedding.base import Embedder, HashEmbedder
from memory.embedding.cache import CachingEmbedder
from memory.layer import Turn
from memory.outbox import Outbox
from memory.service import MemoryService
from memory.store.edge import EdgeStore


class Counting(HashEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return super().embed(texts)


def test_each_text_is_embedded_once_while_it_is_recent() -> None:
    inner = Counting()
    cache = CachingEmbedder(inner)
    first = cache.embed(["a b", "c d"])
    again = cache.embed(["c d", "e f", "e f", "a b"])
    assert inner.calls == [["a b", "c d"], ["e f"]]
    assert again[0] == first[1] and again[3] == first[0] and again[1] == again[2]
    assert again[1] == pytest.approx(inner.embed(["e f"])[0], abs=1e-6)
    assert (cache.hits, cache.misses) == (3, 3)
    again[0][0] = 99.0  # a caller's list is its own
    assert cache.embed(["c d"])[0] == first[1]


def test_the_oldest_texts_are_forgotten_first() -> None:
    inner = Counting()
    cache = CachingEmbedder(inner, entries=2)
    cache.embed(["one"])
    cache.embed(["two"])
    cache.embed(["one"])  # recent again
    cache.embed(["three"])  # forgets "two"
    cache.embed(["one", "two"])
    assert inner.calls == [["one"], ["two"], ["three"], ["two"]]


def test_it_speaks_for_the_model_it_wraps() -> None:
    inner: Embedder = HashEmbedder(dim=8)
    cache = CachingEmbedder(inner)
    assert (cache.model_id, cache.dim, cache.same_space) == (inner.model_id, 8, inner.same_space)


async def test_a_recalled_turn_is_not_embedded_again_when_written_back(tmp_path: Path) -> None:
    inner = Counting()
    store = EdgeStore(tmp_path / "store", embedding_model=inner.model_id, dim=inner.dim)
    service = MemoryService(store=store, embedder=inner, outbox=Outbox(tmp_path / "outbox"))
    await service.start()
    try:
        turn = Turn(request_id="r1", tenant="t", user="ann", session_id=None, model="m")
        said = [{"role": "user", "content": "My cello is in the attic."}]
        await service.recall(turn, said)
        assert await service.remember(turn, said, "Noted.")
        await service.flush()
        embedded = [text for call in inner.calls for text in call]
        assert embedded.count("My cello is in the attic.") == 1
        hits = service.admin.search("t", "Where is my cello?", user="ann")
        assert [h.item.text for h in hits] == ["My cello is in the attic."]
    finally:
        await service.stop()
        service.close()
