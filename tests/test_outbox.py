"""The durable outbox (memory.outbox) and its write-back worker (memory.writeback),
down to a real ``kill -9``."""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from memory.errors import MemoryUnavailable
from memory.layer import Exchange
from memory.outbox import Outbox
from memory.writeback import WriteBackWorker

REPO = Path(__file__).resolve().parent.parent
SECRET = "my card number is 4111"


def ex(rid: str, reply: str | None = "ok") -> Exchange:
    return Exchange(request_id=rid, tenant="t1", user="alice", session_id="s1", model="m",
                    messages=[{"role": "user", "content": SECRET}], reply=reply,
                    options={"top_k": 3}, at=1700000000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A batch handler that records what it saw and fails on demand."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.fail_on: set[str] = set()  # any batch holding one of these raises ...
        self.fail_with: Callable[[str], Exception] = ValueError  # ... this
        self.fail_times = 0  # the next N calls raise whatever they hold

    async def __call__(self, batch: list[Exchange]) -> None:
        rids = [e.request_id for e in batch]
        self.batches.append(rids)
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("embedder unavailable")
        if self.fail_on.intersection(rids):
            raise self.fail_with(f"cannot extract from {batch[0].messages}")

    @property
    def seen(self) -> list[str]:
        return [rid for batch in self.batches for rid in batch]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def worker(outbox: Outbox, recorder: Recorder) -> AsyncIterator[WriteBackWorker]:
    w = WriteBackWorker(outbox, recorder, batch_size=4, max_attempts=3, backoff=lambda n: 0.0)
    yield w
    await w.stop(timeout=5)


# -- the outbox -------------------------------------------------------------------------


def test_exchange_json_round_trip_ignores_unknown_fields() -> None:
    original = ex("r1")
    assert Exchange.from_json(original.to_json()) == original
    newer = original.to_json()[:-1] + ',"added_later":1}'
    assert Exchange.from_json(newer) == original


async def test_claim_returns_due_items_in_seq_order_and_ack_deletes(outbox: Outbox) -> None:
    seqs = [await outbox.append(ex(f"r{i}")) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    claimed = outbox.claim(3)
    assert [(s, e.request_id) for s, e in claimed] == list(zip(seqs[:3], ["r0", "r1", "r2"], strict=True))
    assert claimed[0][1] == ex("r0")
    outbox.ack([s for s, _ in claimed])
    assert [e.request_id for _, e in outbox.claim(10)] == ["r3", "r4"]
    assert outbox.pending_count() == 2
    assert outbox.last_seq() == seqs[-1]


async def test_duplicate_request_id_is_a_no_op_returning_the_first_seq(outbox: Outbox) -> None:
    first = await outbox.append(ex("same"))
    await outbox.append(ex("other"))
    again = await outbox.append(ex("same", reply="a different reply"))
    assert again == first
    assert outbox.pending_count() == 2
    assert outbox.claim(10)[0][1].reply == "ok"


async def test_concurrent_appends_all_land_with_distinct_seqs(outbox: Outbox) -> None:
    seqs = await asyncio.gather(*(outbox.append(ex(f"r{i}")) for i in range(50)))
    assert len(set(seqs)) == 50
    assert outbox.pending_count() == 50
    by_rid = {e.request_id: s for s, e in outbox.claim(100)}
    assert by_rid == {f"r{i}": s for i, s in enumerate(seqs)}


async def test_appends_survive_reopen_and_seqs_are_never_reused(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    a = await box.append(ex("a"))
    b = await box.append(ex("b"))
    box.ack([b])  # the highest seq is gone, yet must not be handed out again
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert [(s, e) for s, e in box.claim(10)] == [(a, ex("a"))]
    c = await box.append(ex("c"))
    assert c > b
    box.close()


async def test_closed_outbox_refuses_appends(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.close()
    with pytest.raises(RuntimeError, match="closed"):
        await box.append(ex("a"))


async def test_retry_later_waits_out_the_delay_then_dead_letters(tmp_path: Path) -> None:
    clock = Clock()
    box = Outbox(tmp_path / "o.db", max_attempts=3, clock=clock)
    seq = await box.append(ex("r"))
    assert box.retry_later(seq, 10.0, "ValueError: first") is False
    assert box.claim(10) == [] and box.next_due_in() == 10.0
    clock.now += 10
    assert [s for s, _ in box.claim(10)] == [seq]
    assert box.attempts(seq) == 1
    assert box.retry_later(seq, 10.0, "ValueError: second") is False
    assert box.retry_later(seq, 10.0, "ValueError: third") is True
    assert (box.pending_count(), box.dead_count()) == (0, 1)
    [dead] = box.dead()
    assert (dead.seq, dead.exchange, dead.attempts, dead.error) == (seq, ex("r"), 3, "ValueError: third")
    box.close()


async def test_unreadable_row_goes_to_dead_instead_of_blocking_the_queue(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    bad = await box.append(ex("bad"))
    await box.append(ex("good"))
    with sqlite3.connect(tmp_path / "o.db") as raw:
        raw.execute("UPDATE outbox SET payload = '{not json' WHERE seq = ?", (bad,))
    assert [e.request_id for _, e in box.claim(10)] == ["good"]
    assert box.dead_count() == 1 and box.dead()[0].error.startswith("unreadable payload")
    box.close()


# -- the worker -------------------------------------------------------------------------


async def test_flush_returns_once_everything_appended_is_handled(
        outbox: Outbox, worker: WriteBackWorker, recorder: Recorder) -> None:
    worker.start()
    for i in range(10):
        await outbox.append(ex(f"r{i}"))
        worker.notify()
    await worker.flush(timeout=5)
    assert recorder.seen == [f"r{i}" for i in range(10)]
    assert all(len(b) <= 4 for b in recorder.batches)
    assert outbox.pending_count() == 0


async def test_worker_drains_what_a_previous_process_left(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for i in range(6):
        await box.append(ex(f"r{i}"))
    box.close()  # no worker ran: the "process" ended with a backlog

    box = Outbox(tmp_path / "o.db")
    recorder = Recorder()
    worker = WriteBackWorker(box, recorder, batch_size=4)
    worker.start()  # no notify(): startup alone must find the backlog
    await worker.flush(timeout=5)
    assert recorder.batches == [["r0", "r1", "r2", "r3"], ["r4", "r5"]]
    await worker.stop()
    box.close()


async def test_flush_is_not_held_up_by_appends_made_while_it_waits(outbox: Outbox) -> None:
    entered, gate, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handle(batch: list[Exchange]) -> None:
        if batch[0].request_id == "early":
            entered.set()
            await gate.wait()
        else:
            await never.wait()  # later exchanges never finish during this test

    worker = WriteBackWorker(outbox, handle, batch_size=1)
    worker.start()
    await outbox.append(ex("early"))
    worker.notify()
    await entered.wait()
    flushing = asyncio.create_task(worker.flush(timeout=5))
    await asyncio.sleep(0)  # let flush take its watermark
    for i in range(3):
        await outbox.append(ex(f"late{i}"))
        worker.notify()
    gate.set()
    await flushing
    assert outbox.pending_count() == 3
    await worker.stop(timeout=0.1)  # the stuck batch is cancelled, not lost
    assert outbox.pending_count() == 3


async def test_flush_times_out_instead_of_hanging(outbox: Outbox) -> None:
    async def handle(batch: list[Exchange]) -> None:
        await asyncio.Event().wait()

    worker = WriteBackWorker(outbox, handle)
    worker.start()
    await outbox.append(ex("stuck"))
    worker.notify()
    with pytest.raises(TimeoutError):
        await worker.flush(timeout=0.05)
    await worker.stop(timeout=0.1)
    assert outbox.pending_count() == 1


async def test_flush_without_a_running_worker_raises(worker: WriteBackWorker) -> None:
    with pytest.raises(RuntimeError, match="not running"):
        await worker.flush()


async def test_poison_exchange_is_isolated_and_dead_lettered(
        outbox: Outbox, worker: WriteBackWorker, recorder: Recorder,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="memory.writeback")
    recorder.fail_on = {"poison"}
    for rid in ["a", "poison", "b", "c", "d"]:
        await outbox.append(ex(rid))
    worker.start()
    await worker.flush(timeout=5)
    assert recorder.batches == [
        ["a", "poison", "b", "c"],  # the batch fails ...
        ["a"], ["poison"], ["b"], ["c"],  # ... so each is tried alone: only poison fails
        ["poison"], ["d"],  # a suspect never joins a batch again
        ["poison"],  # third attempt: dead
    ]
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 1)
    [dead] = outbox.dead()
    assert dead.exchange.request_id == "poison" and dead.attempts == 3
    assert dead.error.startswith("ValueError: cannot extract")
    assert "poison" in caplog.text
    assert SECRET not in caplog.text  # logs name the request, never its contents


async def test_transient_failure_is_retried_until_it_succeeds(
        outbox: Outbox, worker: WriteBackWorker, recorder: Recorder) -> None:
    recorder.fail_times = 2
    await outbox.append(ex("r"))
    worker.start()
    await worker.flush(timeout=5)
    assert recorder.batches == [["r"], ["r"], ["r"]]
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 0)


async def test_stop_finishes_the_batch_in_hand_and_start_resumes(outbox: Outbox) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()
    seen: list[str] = []

    async def handle(batch: list[Exchange]) -> None:
        entered.set()
        await gate.wait()
        seen.extend(e.request_id for e in batch)

    for i in range(5):
        await outbox.append(ex(f"r{i}"))
    worker = WriteBackWorker(outbox, handle, batch_size=2)
    worker.start()
    await entered.wait()
    stopping = asyncio.create_task(worker.stop(timeout=5))
    await asyncio.sleep(0)  # let stop() ask the worker to stop
    gate.set()
    await stopping
    assert not worker.running
    assert seen == ["r0", "r1"]  # the in-flight batch finished and was acked ...
    assert outbox.pending_count() == 3  # ... and the rest waits for the next start

    worker.start()
    await worker.flush(timeout=5)
    assert seen == [f"r{i}" for i in range(5)]
    await worker.stop()


# -- outages of the destination ---------------------------------------------------------


class Destination:
    """A store that is up or down: the handler writes to it, the probe checks it."""

    def __init__(self) -> None:
        self.up = True
        self.probes = 0
        self.written: list[str] = []

    async def handle(self, batch: list[Exchange]) -> None:
        if not self.up:
            # What the memory layer raises for a store that is down (GuardedStore).
            raise MemoryUnavailable("store unreachable")
        self.written.extend(e.request_id for e in batch)

    async def probe(self) -> None:
        self.probes += 1
        if not self.up:
            raise ConnectionError("store unreachable")


@pytest.fixture
async def destination() -> Destination:
    return Destination()


@pytest.fixture
async def guarded(outbox: Outbox, destination: Destination) -> AsyncIterator[WriteBackWorker]:
    w = WriteBackWorker(outbox, destination.handle, batch_size=4, max_attempts=2,
                        backoff=lambda n: 0.0, probe=destination.probe)
    yield w
    await w.stop(timeout=5)


async def test_outage_spends_no_attempts_and_resumes_when_the_store_returns(
        outbox: Outbox, guarded: WriteBackWorker, destination: Destination) -> None:
    destination.up = False
    for rid in ["a", "b", "c", "d", "e", "f"]:
        await outbox.append(ex(rid))
    guarded.start()
    for _ in range(3):  # far more than max_attempts=2 tries at the store
        with pytest.raises(MemoryUnavailable, match="6 exchanges wait in the outbox"):
            await guarded.flush(timeout=5)
    assert guarded.outage is True
    assert destination.probes >= 3
    assert [outbox.attempts(seq) for seq in range(1, 7)] == [0] * 6
    assert (outbox.pending_count(), outbox.dead_count()) == (6, 0)

    destination.up = True
    await guarded.flush(timeout=5)
    assert guarded.outage is False
    assert destination.written == ["a", "b", "c", "d", "e", "f"]
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 0)


async def test_bad_item_with_a_healthy_store_is_still_dead_lettered(
        outbox: Outbox, destination: Destination) -> None:
    """The store fails for one exchange only (say, a point it refuses): the probe
    passes, so the failure is the exchange's."""
    recorder = Recorder()
    recorder.fail_on = {"poison"}
    recorder.fail_with = MemoryUnavailable
    worker = WriteBackWorker(outbox, recorder, batch_size=4, max_attempts=2,
                             backoff=lambda n: 0.0, probe=destination.probe)
    for rid in ["a", "poison", "b"]:
        await outbox.append(ex(rid))
    worker.start()
    await worker.flush(timeout=5)
    await worker.stop()
    assert destination.probes >= 2  # each failure asked the store first
    assert worker.outage is False
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 1)
    assert outbox.dead()[0].request_id == "poison"


@pytest.mark.parametrize("error", [ValueError, KeyError])
async def test_handler_bug_counts_against_the_exchange_without_a_probe(
        outbox: Outbox, error: type[Exception]) -> None:
    """A bug (a bad exchange) is no sign of an outage: the store is not asked."""
    probes: list[str] = []

    async def probe() -> None:
        probes.append("probe")

    written: list[str] = []

    async def handle(batch: list[Exchange]) -> None:
        if any(e.request_id == "bad" for e in batch):
            raise error("reply")
        written.extend(e.request_id for e in batch)

    worker = WriteBackWorker(outbox, handle, batch_size=4, max_attempts=2,
                             backoff=lambda n: 0.0, probe=probe)
    for rid in ["a", "bad", "b"]:
        await outbox.append(ex(rid))
    worker.start()
    await worker.flush(timeout=5)
    await worker.stop()
    assert probes == []
    assert worker.outage is False
    assert written == ["a", "b"]
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 1)
    [dead] = outbox.dead()
    assert (dead.request_id, dead.attempts) == ("bad", 2)
    assert dead.error.startswith(error.__name__)


async def test_store_failing_mid_split_stops_counting(outbox: Outbox) -> None:
    """The batch fails, the worker retries one by one, and the store goes down under
    it: the item that met the outage is not charged for it."""
    destination = Destination()
    calls = 0

    async def handle(batch: list[Exchange]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("one bad item somewhere")
        if calls == 3:
            destination.up = False
        await destination.handle(batch)

    worker = WriteBackWorker(outbox, handle, batch_size=4, max_attempts=2,
                             backoff=lambda n: 0.0, probe=destination.probe)
    for rid in ["a", "b", "c"]:
        await outbox.append(ex(rid))
    worker.start()
    with pytest.raises(MemoryUnavailable):
        await worker.flush(timeout=5)
    assert destination.written == ["a"]
    assert [outbox.attempts(seq) for seq in (2, 3)] == [0, 0]
    destination.up = True
    await worker.flush(timeout=5)
    await worker.stop()
    assert destination.written == ["a", "b", "c"]
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 0)


async def test_without_a_probe_memory_unavailable_is_an_outage(outbox: Outbox) -> None:
    down = True

    async def handle(batch: list[Exchange]) -> None:
        if down:
            raise MemoryUnavailable("store down")

    worker = WriteBackWorker(outbox, handle, max_attempts=1, backoff=lambda n: 0.0)
    await outbox.append(ex("a"))
    worker.start()
    with pytest.raises(MemoryUnavailable):
        await worker.flush(timeout=5)
    assert (outbox.attempts(1), outbox.dead_count()) == (0, 0)
    down = False
    await worker.flush(timeout=5)
    await worker.stop()
    assert (outbox.pending_count(), outbox.dead_count()) == (0, 0)


async def test_stop_ends_an_outage_wait(outbox: Outbox, guarded: WriteBackWorker,
                                        destination: Destination) -> None:
    destination.up = False
    await outbox.append(ex("a"))
    guarded.start()
    with pytest.raises(MemoryUnavailable):
        await guarded.flush(timeout=5)
    await asyncio.wait_for(guarded.stop(), 2)
    assert not guarded.running
    assert outbox.pending_count() == 1  # kept for the next start


async def test_full_disk_append_fails_and_marks_the_outbox_unwritable(outbox: Outbox) -> None:
    big = Exchange(request_id="big", tenant="t1", user="alice", session_id=None, model="m",
                   messages=[{"role": "user", "content": "x" * 20000}], reply="ok",
                   options={}, at=1)
    outbox.limit_size(0)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        await outbox.append(big)
    assert outbox.writable is False
    assert outbox.pending_count() == 0
    outbox.limit_size(None)
    assert await outbox.append(big) == 1
    assert outbox.writable is True


# -- kill -9 ----------------------------------------------------------------------------

N = 120
# (what the parent counts before it kills, how many of those, or None: the child kills
# itself inside the handler after that many store writes, before the ack.)
KILLS = [
    pytest.param("ack", seed, id=f"mid-append-{seed}") for seed in (1, 2, 3)
] + [
    pytest.param("handled", seed, id=f"mid-handle-{seed}") for seed in (4, 5, 6)
] + [
    pytest.param("acked", seed, id=f"after-ack-{seed}") for seed in (7, 8)
] + [
    pytest.param("self", seed, id=f"in-handler-before-ack-{seed}") for seed in (9, 10)
]


def child(*args: object) -> list[str]:
    return [sys.executable, "-m", "tests.outbox_crash_child", *map(str, args)]


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.parametrize(("point", "seed"), KILLS)
def test_kill_9_loses_no_acknowledged_exchange(tmp_path: Path, point: str, seed: int,
                                               record_property: Callable[[str, object], None]) -> None:
    rng = random.Random(seed)
    box, store = tmp_path / "outbox.db", tmp_path / "store.db"
    kill_at = {"ack": rng.randint(1, N - 1), "handled": rng.randint(1, N // 2),
               "acked": rng.randint(1, 8), "self": rng.randint(1, N // 2)}[point]
    args = (box, store, N, kill_at) if point == "self" else (box, store, N)
    proc = subprocess.Popen(child("produce", *args), cwd=REPO, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = lines_of(proc)
    acknowledged: set[str] = set()
    counted = 0
    try:
        while (line := lines.get(timeout=60)) is not None:
            if not line.endswith("\n"):
                continue  # cut off by the kill: never reached the caller
            kind, _, value = line.strip().partition(" ")
            if kind == "ack":
                acknowledged.add(value)
            if kind == point or (point == "self" and kind == "handled"):
                counted += 1
                if counted == kill_at and point != "self":
                    proc.send_signal(signal.SIGKILL)
            if kind == "done":
                proc.send_signal(signal.SIGKILL)  # too late for the planned point: still fail loudly
    finally:
        proc.kill()
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    assert counted >= kill_at, f"the child finished before {point} #{kill_at}"

    recovered = subprocess.run(child("recover", box, store), cwd=REPO, text=True,
                               capture_output=True, timeout=60)
    assert recovered.returncode == 0, recovered.stderr
    assert "recovered pending=0 dead=0" in recovered.stdout

    with sqlite3.connect(store) as db:
        rids = [r for (r,) in db.execute("SELECT request_id FROM items")]
        calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert len(rids) == len(set(rids))  # one point per exchange, however often delivered
    assert acknowledged <= set(rids)  # nothing acknowledged was lost
    assert set(rids) <= {f"req-{i:05d}" for i in range(N)}
    replayed = calls - len(rids)
    record_property("replayed", replayed)
    print(f"\n{point} kill at {kill_at}: acknowledged={len(acknowledged)} "
          f"stored={len(rids)} handler_calls={calls} replayed={replayed}")
    if point == "self":
        assert replayed >= 1  # the killed batch was written but never acked
