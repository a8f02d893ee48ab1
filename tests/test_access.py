"""Coalesced access counts: noted on the request path, written together later."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from memory.access import AccessRecorder
from memory.embedding.base import HashEmbedder
from memory.models import MemoryItem
from memory.store.edge import EdgeStore


class CountingStore(EdgeStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path, embedding_model="h", dim=HashEmbedder().dim)
        self.touches: list[tuple[str, list[str], int]] = []
        self.fail = False

    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        if self.fail:
            raise OSError("store unavailable")
        self.touches.append((tenant, sorted(memory_ids), at))
        super().touch(tenant, memory_ids, at)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    s = CountingStore(tmp_path / "store")
    items = [MemoryItem(id=i, tenant="t1", cube_id="c", user="u", text=i) for i in ("a", "b")]
    s.upsert(items, HashEmbedder().embed(["a", "b"]))
    yield s
    s.close()


async def test_accesses_in_one_interval_are_written_once_summed(store: CountingStore) -> None:
    rec = AccessRecorder(store, interval=3600)
    rec.record("t1", ["a", "b"], 100)
    rec.record("t1", ["a"], 105)
    rec.record("t2", ["x"], 101)
    assert store.touches == []  # nothing on the request path
    await rec.flush()
    assert sorted(store.touches) == [("t1", ["a", "a", "b"], 105), ("t2", ["x"], 101)]
    assert store.get("t1", "a").access_count == 2  # type: ignore[union-attr]
    await rec.flush()
    assert len(store.touches) == 2  # nothing pending, nothing written
    await rec.stop()


async def test_the_timer_writes_without_a_flush(store: CountingStore) -> None:
    rec = AccessRecorder(store, interval=0.01)
    rec.record("t1", ["b"], 7)
    for _ in range(200):
        if store.touches:
            break
        await asyncio.sleep(0.01)
    assert store.touches == [("t1", ["b"], 7)]
    await rec.stop()


async def test_stop_writes_what_is_pending(store: CountingStore) -> None:
    rec = AccessRecorder(store, interval=3600)
    rec.record("t1", ["a"], 9)
    await rec.stop()
    assert store.touches == [("t1", ["a"], 9)]


async def test_a_failing_store_is_logged_not_raised(store: CountingStore,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rec = AccessRecorder(store, interval=3600)
    store.fail = True
    rec.record("t1", ["a"], 9)
    await rec.flush()
    assert "recording memory access failed: OSError" in caplog.text
    await rec.stop()
