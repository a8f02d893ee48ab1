"""A store outage costs callers one wait, not one each.

- :class:`memory.store.guard.GuardedStore`: once a call has failed as an outage, later
  calls fail fast without trying the store, until a growing pause is over (then one
  call tests the water) or a probe finds the store back; ``probe`` always tries.
- :class:`memory.store.server.ServerStore` with ``connect_later``: while one caller
  connects to a server that never answers, the others fail at once instead of
  queueing for a timeout each, and a failed connect is not retried by every call.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from memory.embedding.base import HashEmbedder
from memory.errors import MemoryUnavailable
from memory.models import Cube, MemoryItem
from memory.store.base import StoreError
from memory.store.edge import EdgeStore
from memory.store.faulty import FaultyStore
from memory.store.guard import GuardedStore
from memory.store.server import ServerStore
from memory.store.wrapper import Kind

EMB = HashEmbedder(dim=64)
T = TypeVar("T")


class SlowFaulty(FaultyStore):
    """Fails the way ``FaultyStore`` does, after a delay (a client waiting out its
    timeout), and counts every call that reached it."""

    def __init__(self, inner: EdgeStore, delay: float = 0.1) -> None:
        super().__init__(inner)
        self.delay = delay
        self.calls = 0

    def _call(self, kind: Kind, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.calls += 1
        if self.mode != "ok":
            time.sleep(self.delay)
        return super()._call(kind, fn, *args, **kwargs)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[SlowFaulty]:
    store = SlowFaulty(EdgeStore(tmp_path / "store", embedding_model=EMB.model_id, dim=EMB.dim))
    yield store
    store.close()


def item(memory_id: str = "m1") -> MemoryItem:
    return MemoryItem(id=memory_id, tenant="t1", cube_id="c1", user="u1", text="I keep bees")


# -- GuardedStore ------------------------------------------------------------------------


def test_an_outage_is_met_once_then_calls_fail_fast(faulty: SlowFaulty) -> None:
    guard = GuardedStore(faulty)
    faulty.mode = "down"
    started = time.monotonic()
    for _ in range(10):
        with pytest.raises(MemoryUnavailable, match=r"unavailable \(ConnectionError\)"):
            guard.get("t1", "m1")
    with pytest.raises(MemoryUnavailable, match=r"unavailable \(ConnectionError\)"):
        guard.upsert([item()], EMB.embed(["I keep bees"]))
    # One call waited for the store to fail; today's guard lets all eleven wait.
    assert faulty.calls == 1
    assert time.monotonic() - started < 5 * faulty.delay


def test_calls_test_the_water_at_growing_intervals_and_a_probe_always_asks(
        faulty: SlowFaulty) -> None:
    from memory.store.guard import RETRY_FIRST_S, RETRY_MAX_S

    clock = Clock()
    guard = GuardedStore(faulty, clock=clock)
    faulty.mode = "down"

    def reaches_store() -> bool:
        before = faulty.calls
        with pytest.raises(MemoryUnavailable):
            guard.count("t1")
        return faulty.calls > before

    assert reaches_store()
    pauses = []
    for _ in range(8):
        waited = 0.0
        while not reaches_store():
            clock.now += 0.05
            waited += 0.05
        pauses.append(round(waited, 2))
    assert pauses[0] == pytest.approx(RETRY_FIRST_S, abs=0.06)
    assert pauses == sorted(pauses)  # growing while the store stays down ...
    assert pauses[-2:] == pytest.approx([RETRY_MAX_S] * 2, abs=0.06)  # ... up to a cap

    # The write-back worker's probe always asks the store, outage or not.
    before = faulty.calls
    with pytest.raises(MemoryUnavailable):
        guard.probe()
    assert faulty.calls == before + 1
    faulty.mode = "ok"
    guard.probe()
    # The store answered a probe: calls go through again at once.
    assert guard.count("t1") == 0
    assert faulty.calls == before + 3


def test_the_first_call_after_the_pause_ends_the_outage_when_it_works(faulty: SlowFaulty) -> None:
    clock = Clock()
    guard = GuardedStore(faulty, clock=clock)
    faulty.mode = "down"
    with pytest.raises(MemoryUnavailable):
        guard.list_cubes("t1")
    faulty.mode = "ok"
    with pytest.raises(MemoryUnavailable):
        guard.list_cubes("t1")  # the pause is not over: not asked
    assert faulty.calls == 1
    clock.now += 1
    assert guard.list_cubes("t1") == []
    assert guard.list_cubes("t1") == []
    assert faulty.calls == 3


def test_failed_writes_stop_writes_only(faulty: SlowFaulty) -> None:
    guard = GuardedStore(faulty)
    cube = Cube(id="c1", tenant="t1", name="notes")
    faulty.mode = "read-only"
    for _ in range(3):
        with pytest.raises(MemoryUnavailable, match=r"unavailable \(OSError\)"):
            guard.put_cube(cube)
    assert faulty.calls == 1
    # A read-only disk still serves reads, and they reach the store.
    assert guard.get_cube("t1", "c1") is None
    assert guard.list_cubes("t1") == []
    assert faulty.calls == 3


def test_the_callers_mistakes_start_no_outage(faulty: SlowFaulty) -> None:
    guard = GuardedStore(faulty)
    for _ in range(2):
        with pytest.raises(ValueError, match="cursor"):
            guard.list_items("t1", cursor="not-a-cursor")
    assert guard.count("t1") == 0
    assert faulty.calls == 3


# -- ServerStore connecting late ----------------------------------------------------------

TIMEOUT = 1  # qdrant-client's timeout (s) for each request


@contextmanager
def silent_server() -> Iterator[str]:
    """A loopback port whose kernel accepts connections that nobody ever answers: a
    client sends its request and waits out its timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def late_store(url: str) -> ServerStore:
    return ServerStore.from_url(url, embedding_model=EMB.model_id, dim=EMB.dim, timeout=TIMEOUT,
                                connect_later=True, check_compatibility=False)


def timed_calls(store: ServerStore, callers: int) -> tuple[float, list[float], list[BaseException]]:
    """``callers`` threads calling at once: the time all took, each one's, their errors."""
    took: list[float] = []
    errors: list[BaseException] = []
    start = threading.Barrier(callers)

    def call() -> None:
        start.wait()
        began = time.monotonic()
        try:
            store.count("t1")
        except Exception as exc:
            errors.append(exc)
        took.append(time.monotonic() - began)

    began = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return time.monotonic() - began, took, errors


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_callers_fail_at_once_while_another_connects() -> None:
    with silent_server() as url:
        store = late_store(url)  # its first attempt timed out
        try:
            time.sleep(TIMEOUT + 0.2)  # past the pause after that attempt
            total, took, errors = timed_calls(store, 4)
        finally:
            store.close()
    assert len(errors) == 4  # nobody got an answer ...
    # ... but only one caller waited for the timeout; today each waits in turn (4 s).
    assert total < 2 * TIMEOUT
    assert sorted(took)[:3] == pytest.approx([0, 0, 0], abs=0.3)
    assert sum(isinstance(e, StoreError) for e in errors) >= 3


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_a_failed_connect_is_retried_after_a_pause_not_by_every_call() -> None:
    with silent_server() as url:
        store = late_store(url)
        try:
            began = time.monotonic()
            for _ in range(5):
                with pytest.raises(StoreError, match="next attempt in"):
                    store.count("t1")
            fast = time.monotonic() - began
            time.sleep(TIMEOUT + 0.2)
            began = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - the client's own timeout error
                store.count("t1")  # due again: this one tries, and waits
            tried = time.monotonic() - began
            with pytest.raises(StoreError, match="next attempt in"):
                store.count("t1")
        finally:
            store.close()
    assert fast < 0.5  # today: 5 timeouts
    assert tried >= TIMEOUT * 0.9
