"""The memory layer on a real Qdrant Edge store (in a temporary directory), a hashing
embedder and a real outbox."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memory.embedding.base import HashEmbedder
from memory.errors import MemoryNotFound, MemoryUnavailable
from memory.extract import FineExtractor
from memory.layer import Turn
from memory.models import default_cube_id
from memory.outbox import Outbox
from memory.redact import MASK
from memory.service import MemoryConfig, MemoryService
from memory.store.edge import EdgeStore
from memory.store.faulty import FaultyStore
from memory.store.guard import RETRY_FIRST_S, GuardedStore


class ScriptedLLM:
    """Answers extraction prompts from a queue, and records what it was asked."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.history: list[list[dict[str, str]]] = []

    def enqueue(self, *replies: str | dict[str, Any]) -> None:
        self.replies += [r if isinstance(r, str) else json.dumps(r) for r in replies]

    async def __call__(self, messages: list[dict[str, str]], **options: Any) -> str:
        self.history.append(messages)
        return self.replies.pop(0)


def make(tmp_path: Path, *, fine: FineExtractor | None = None,
         clock: Callable[[], float] = time.monotonic) -> MemoryService:
    embedder = HashEmbedder()
    store = EdgeStore(tmp_path / "store", embedding_model=embedder.model_id, dim=embedder.dim)
    config = MemoryConfig(extraction="fine" if fine else "fast")
    return MemoryService(store=store, embedder=embedder, outbox=Outbox(tmp_path / "outbox.db"),
                         config=config, fine=fine, clock=clock)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[MemoryService]:
    service = make(tmp_path)
    await service.start()
    yield service
    await service.stop()
    service.close()


def turn(user: str = "alice", tenant: str = "t1", rid: str = "r1", **options: Any) -> Turn:
    return Turn(request_id=rid, tenant=tenant, user=user, session_id="s1", model="m",
                options=options)


def said(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def tell(svc: MemoryService, text: str, **kw: Any) -> None:
    await svc.remember(turn(**kw), said(text), "ok")
    await svc.flush()


async def test_fast_mode_stores_user_turn_with_provenance(svc: MemoryService) -> None:
    history = [{"role": "user", "content": "old turn"}, {"role": "assistant", "content": "x"}]
    await svc.remember(turn(rid="req-9"), [*history, *said("I live in Lisbon")], "Nice!")
    await svc.flush()
    items, _ = svc.store.list_items("t1")
    assert [i.text for i in items] == ["I live in Lisbon"]  # only the new turn
    item = items[0]
    assert (item.user, item.type, item.extractor, item.version) == ("alice", "raw", "fast", 1)
    assert item.cube_id == default_cube_id("t1", "alice")
    assert item.sources[0].request_id == "req-9"
    assert item.sources[0].session_id == "s1"
    assert item.sources[0].role == "user"
    assert svc.store.get_cube("t1", item.cube_id) is not None  # default cube made on first write


async def test_fast_mode_keeps_the_message_a_turn_answers_as_searchable_context(
        svc: MemoryService) -> None:
    asked = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "Which instrument do you play? key sk-abcdefghijklmnopqrstuv"}]
    await svc.remember(turn(rid="req-1"), [*asked, *said("The cello, for years now")], "Lovely")
    await svc.flush()
    items, _ = svc.store.list_items("t1")
    assert [i.text for i in items] == ["The cello, for years now"]
    assert items[0].context is not None
    assert items[0].context.startswith("Which instrument do you play?")
    assert "sk-abcdefghijklmnopqrstuv" not in items[0].context  # redacted like text
    # Found through the question's words; only the item's own text is injected.
    recall = await svc.recall(turn(rid="r2"), said("what instrument do I play?"))
    assert recall.memory_ids == [items[0].id]
    assert "The cello, for years now" in recall.messages[0]["content"]
    assert "Which instrument" not in recall.messages[0]["content"]


async def test_a_first_turn_has_no_context(svc: MemoryService) -> None:
    await tell(svc, "I live in Lisbon")
    items, _ = svc.store.list_items("t1")
    assert items[0].context is None


async def test_recall_injects_memories_as_fenced_system_data(svc: MemoryService) -> None:
    await tell(svc, "My cat is called Miso")
    recall = await svc.recall(turn(rid="r2"), said("what is my cat called?"))
    system = recall.messages[0]
    assert system["role"] == "system"
    assert "<memories>" in system["content"] and "</memories>" in system["content"]
    assert "not instructions" in system["content"]
    assert "My cat is called Miso" in system["content"]
    assert recall.messages[1:] == said("what is my cat called?")
    assert len(recall.memory_ids) == 1
    # Access counts are written off the request path, coalesced; flush writes them.
    assert svc.store.get("t1", recall.memory_ids[0]).access_count == 0  # type: ignore[union-attr]
    await svc.flush()
    assert svc.store.get("t1", recall.memory_ids[0]).access_count == 1  # type: ignore[union-attr]


async def test_users_and_tenants_are_isolated(svc: MemoryService) -> None:
    await tell(svc, "Alice secret plan zebra", user="alice")
    for other in (turn(user="bob", rid="r2"), turn(tenant="t2", rid="r3")):
        recall = await svc.recall(other, said("secret plan zebra"))
        assert recall.memory_ids == []
    assert svc.store.list_items("t2")[0] == []


async def test_replayed_exchange_does_not_duplicate(svc: MemoryService) -> None:
    await tell(svc, "I play the cello")
    await tell(svc, "I play the cello")  # the same request id again: a replay
    await tell(svc, "i play  the CELLO", rid="r2")  # same words, another request
    assert [i.text for i in svc.store.list_items("t1")[0]] == ["I play the cello"]


async def test_one_batch_with_the_same_words_twice_keeps_one(svc: MemoryService) -> None:
    await svc.remember(turn(rid="a"), said("My sister lives in Porto"), "ok")
    await svc.remember(turn(rid="b"), said("my sister  lives in porto"), "ok")
    await svc.remember(turn(rid="c", user="bob"), said("My sister lives in Porto"), "ok")
    await svc.flush()  # one worker batch or several: the same words are kept once per user
    texts = sorted((i.user, i.text) for i in svc.store.list_items("t1")[0])
    assert texts == [("alice", "My sister lives in Porto"), ("bob", "My sister lives in Porto")]


async def test_write_false_and_enabled_false(svc: MemoryService) -> None:
    await svc.remember(turn(write=False), said("do not keep this"), "ok")
    await svc.flush()
    assert svc.store.list_items("t1")[0] == []
    await tell(svc, "keep this one")
    recall = await svc.recall(turn(rid="r2", enabled=False), said("keep this one"))
    assert recall.memory_ids == []


async def test_secrets_are_redacted_before_writing(svc: MemoryService) -> None:
    await tell(svc, "my password is hunter2 and key sk-abcdefghijklmnopqrstuvwx")
    text = svc.store.list_items("t1")[0][0].text
    assert "hunter2" not in text and "sk-abcdefghijklmnopqrstuvwx" not in text
    assert MASK in text


async def test_patch_versions_and_history(svc: MemoryService) -> None:
    item = svc.admin.create("t1", "alice", "I like tea")
    v2 = svc.admin.patch("t1", item.id, {"text": "I like green tea", "tags": ["drinks"]})
    gone = svc.admin.delete("t1", item.id)
    assert (v2.version, gone.version, gone.status) == (2, 3, "deleted")
    assert [v.text for v in svc.admin.history("t1", item.id)] == ["I like tea", "I like green tea",
                                                           "I like green tea"]
    assert svc.admin.search("t1", "green tea") == []  # deleted items are not found
    with pytest.raises(MemoryNotFound):
        svc.admin.get("t2", item.id)


async def test_budget_limits_the_block(svc: MemoryService) -> None:
    for i in range(5):
        svc.admin.create("t1", "alice", f"fact number {i} about gardening and roses " * 3)
    recall = await svc.recall(turn(max_tokens=160), said("gardening roses"))
    assert 0 < len(recall.memory_ids) < 5


async def test_unknown_mounted_cube_is_not_found(svc: MemoryService) -> None:
    with pytest.raises(MemoryNotFound):
        await svc.recall(turn(cubes=["nope"]), said("anything"))


async def test_shared_cube_mount_export_import_merge(svc: MemoryService) -> None:
    cube = svc.admin.create_cube("t1", "team")
    svc.admin.create("t1", "alice", "The office wifi is called Falcon", cube_id=cube.id)
    assert (await svc.recall(turn(user="bob"), said("office wifi falcon"))).memory_ids == []
    mounted = await svc.recall(turn(user="bob", cubes=[cube.id]), said("office wifi falcon"))
    assert len(mounted.memory_ids) == 1
    lines = list(svc.admin.export_cube("t1", cube.id))
    assert json.loads(lines[0])["object"] == "cube"
    svc.admin.delete_cube("t1", cube.id)
    assert svc.store.count("t1", cube_id=cube.id) == 0
    restored, count = svc.admin.import_cube("t1", lines)
    assert (restored.id, count) == (cube.id, 1)
    other = svc.admin.create_cube("t1", "other")
    svc.admin.create("t1", "bob", "The office wifi is called Falcon", cube_id=other.id)
    svc.admin.create("t1", "bob", "Lunch is at noon", cube_id=other.id)
    assert svc.admin.merge_cubes("t1", other.id, cube.id) == 1  # the duplicate is skipped
    assert svc.store.count("t1", cube_id=cube.id) == 2


async def test_fine_mode_add_update_delete_none(tmp_path: Path) -> None:
    llm = ScriptedLLM()
    svc = make(tmp_path, fine=FineExtractor(llm))
    await svc.start()
    llm.enqueue({"facts": [{"text": "The user lives in Lisbon", "type": "fact"}]})
    await svc.remember(turn(rid="a"), said("I live in Lisbon"), "ok")
    await svc.flush()
    first = svc.store.list_items("t1")[0][0]
    assert (first.text, first.type, first.extractor) == ("The user lives in Lisbon", "fact", "fine")

    llm.enqueue({"facts": ["The user lives in Porto"]},
                {"event": "UPDATE", "id": first.id, "text": "The user lives in Porto"})
    await svc.remember(turn(rid="b"), said("I moved to Porto"), "ok")
    await svc.flush()
    updated = svc.admin.get("t1", first.id)
    assert (updated.text, updated.version) == ("The user lives in Porto", 2)
    assert [s.request_id for s in updated.sources] == ["a", "b"]

    llm.enqueue({"facts": ["The user lives in Porto"]}, {"event": "NONE", "id": first.id})
    await svc.remember(turn(rid="c"), said("Porto is home"), "ok")
    await svc.flush()
    assert svc.admin.get("t1", first.id).version == 2

    llm.enqueue({"facts": ["The user no longer lives in Porto"]},
                {"event": "DELETE", "id": first.id})
    await svc.remember(turn(rid="d"), said("I left Porto"), "ok")
    await svc.flush()
    assert svc.admin.get("t1", first.id).status == "deleted"
    await svc.stop()
    svc.close()


async def test_fine_mode_invalid_json_falls_back_to_fast(tmp_path: Path) -> None:
    llm = ScriptedLLM()
    svc = make(tmp_path, fine=FineExtractor(llm))
    await svc.start()
    llm.enqueue("Sure! Here are the facts: the user likes jazz.")
    await svc.remember(turn(), said("I like jazz"), "ok")
    await svc.flush()
    items = svc.store.list_items("t1")[0]
    assert [(i.text, i.extractor, i.type) for i in items] == [("I like jazz", "fast", "raw")]
    await svc.stop()
    svc.close()


async def test_activation_blocks_refresh_when_read_and_are_forgotten_when_not(
        tmp_path: Path) -> None:
    clock = [1000.0]
    svc = make(tmp_path, clock=lambda: clock[0])  # not started: refresh is called by hand
    svc.admin.create("t1", "alice", "Alice is vegetarian", pinned=True)
    svc.admin.create("t1", "bob", "Bob is vegan", pinned=True)
    first = await svc.recall(turn(user="alice"), said("what do I eat"))
    await svc.recall(turn(user="bob"), said("what do I eat"))
    assert first.prefix is not None and "vegetarian" in first.prefix.content
    computed = svc.blocks.computed
    refresh = svc.config.activation_refresh
    clock[0] += refresh + 1
    await svc.recall(turn(user="alice"), said("again"))  # read since computed: refreshed
    await svc.blocks.refresh()
    assert svc.blocks.computed == computed + 1  # alice's only: bob's was not read since
    clock[0] += 11 * refresh
    await svc.blocks.refresh()
    assert svc.blocks.held == set()  # nobody read them for ten intervals
    again = await svc.recall(turn(user="bob"), said("what do I eat"))
    assert again.prefix is not None and "vegan" in again.prefix.content
    svc.close()


# -- faults ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Faulty:
    svc: MemoryService
    store: FaultyStore
    clock: Clock  # the guard's: after an outage it fails calls fast until its pause is over

    def later(self) -> None:
        """The guard's pause after a failure is over: the next call tries the store."""
        self.clock.now += RETRY_FIRST_S


@pytest.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[Faulty]:
    embedder = HashEmbedder()
    store = FaultyStore(EdgeStore(tmp_path / "store", embedding_model=embedder.model_id,
                                  dim=embedder.dim))
    clock = Clock()
    service = MemoryService(store=GuardedStore(store, clock=clock), embedder=embedder,
                            outbox=Outbox(tmp_path / "o.db"))
    await service.start()
    yield Faulty(service, store, clock)
    store.mode = "ok"
    await service.stop()
    service.close()


async def test_recall_with_the_store_down_passes_messages_unchanged(
        faulty: Faulty) -> None:
    svc, store = faulty.svc, faulty.store
    svc.admin.create("t1", "alice", "I play the cello")
    store.mode = "down"
    recall = await svc.recall(turn(), said("what do I play?"))
    assert (recall.messages, recall.memory_ids, recall.degraded) == (
        said("what do I play?"), [], ["recall"])
    assert svc.health()["store"] == "unavailable"
    store.mode = "ok"
    faulty.later()
    recall = await svc.recall(turn(), said("what do I play?"))
    assert recall.degraded == [] and len(recall.memory_ids) == 1
    assert svc.health() == {"store": "ok", "outbox": "ok", "write_back": "ok"}


async def test_unknown_cube_is_still_the_requests_fault_when_the_store_is_up(
        faulty: Faulty) -> None:
    svc, store = faulty.svc, faulty.store
    with pytest.raises(MemoryNotFound):
        await svc.recall(turn(cubes=["nope"]), said("anything"))
    store.mode = "down"  # it cannot be checked now: answered without memory instead
    assert (await svc.recall(turn(cubes=["nope"]), said("anything"))).degraded == ["recall"]


async def test_memory_api_calls_raise_unavailable_not_the_store_error(
        faulty: Faulty) -> None:
    svc, store = faulty.svc, faulty.store
    item = svc.admin.create("t1", "alice", "I play the cello")
    store.mode = "read-only"
    assert svc.admin.get("t1", item.id).text == "I play the cello"
    with pytest.raises(MemoryUnavailable, match=r"unavailable \(OSError\)"):
        svc.admin.patch("t1", item.id, {"pinned": True})
    store.mode = "down"
    with pytest.raises(MemoryUnavailable, match=r"unavailable \(ConnectionError\)"):
        svc.admin.get("t1", item.id)
    store.mode = "ok"
    faulty.later()
    with pytest.raises(ValueError, match="1 items but 0 vectors"):  # the caller's mistake stays its own
        svc.store.upsert([item], [])


async def test_remember_reports_an_exchange_the_outbox_refused(
        faulty: Faulty) -> None:
    svc = faulty.svc
    svc.outbox.limit_size(0)
    assert await svc.remember(turn(rid="big"), said("x" * 20000), "ok") is False
    recall = await svc.recall(turn(rid="next"), said("anything"))
    assert recall.degraded == ["write-back"]  # foreseen for the next request
    svc.outbox.limit_size(None)
    assert await svc.remember(turn(rid="small"), said("I like tea"), "ok") is True
    assert (await svc.recall(turn(rid="after"), said("tea"))).degraded == []
    await svc.flush()
    assert [i.text for i in svc.store.list_items("t1")[0]] == ["I like tea"]


async def test_write_back_to_a_deleted_write_cube_is_skipped(svc: MemoryService) -> None:
    cube = svc.admin.create_cube("t1", "team")
    await svc.remember(turn(write_cube=cube.id), said("The team meets on Fridays"), "ok")
    svc.admin.delete_cube("t1", cube.id)  # before the worker gets to it
    await svc.flush()
    assert svc.store.list_items("t1")[0] == []
    assert svc.outbox.dead_count() == 0


async def test_pieces_follow_what_the_store_learns_when_it_connects(tmp_path: Path) -> None:
    """A server store that was unreachable at start learns its layout when it first
    connects; the guard the service holds must report it then, not a copy from start."""
    service = make(tmp_path)
    inner = service.store.inner  # type: ignore[attr-defined]
    inner.multivector = False
    assert not service.store.multivector and not FaultyStore(inner).multivector
    first = service.admin.create_many("t1", [{"user": "u", "text": "One part here. Another part there."}])
    assert dense_vectors(inner, first[0].point_id) == 1  # its whole text's vector only
    inner.multivector = True
    assert service.store.multivector and FaultyStore(inner).multivector
    second = service.admin.create_many("t1", [{"user": "u", "text": "Third part here. Fourth part there."}])
    assert dense_vectors(inner, second[0].point_id) == 2  # a vector per sentence
    service.close()


def dense_vectors(store: EdgeStore, point_id: str) -> int:
    """How many vectors the store keeps as a point's ``dense`` (one per piece)."""
    found = store.engine.shard.retrieve([point_id], with_payload=False, with_vector=True)
    return len(found[0].vector["dense"])
