"""The durable write-back outbox and the worker that drains it.

After a chat exchange the proxy appends it here *before* the response ends; a
:class:`WriteBackWorker` later hands batches to the extractor. An appended exchange
survives ``kill -9`` (and, with ``synchronous=FULL``, power loss) from the moment
:meth:`Outbox.append` returns. Delivery is at-least-once: a crash between the handler
finishing and the ack replays the batch, so the handler must be idempotent.

Rows live in SQLite (WAL). ``seq`` is AUTOINCREMENT so it is never reused, which lets
:meth:`WriteBackWorker.flush` wait on a watermark: everything appended before the
call has ``seq <= last_seq()``. Rows that fail ``max_attempts`` times move to the
``dead`` table with their error; nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from memory.errors import MemoryUnavailable
from memory.fsutil import fsync_dir

log = logging.getLogger(__name__)

Handler = Callable[[list["Exchange"]], Awaitable[None]]
Backoff = Callable[[int], float]
#: Raises when the handler's destination (the store) cannot take writes now.
Probe = Callable[[], Awaitable[None]]

#: Longest wait between two probes of a destination that is down, in seconds.
OUTAGE_PROBE_MAX_S = 10.0
_APPEND_THREADS = 4
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, seq);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    died_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Exchange:
    """One chat exchange waiting for extraction: who asked, what was said, the reply."""

    request_id: str
    tenant: str
    user: str
    session_id: str | None
    model: str
    messages: list[dict[str, Any]]
    reply: str | None
    options: dict[str, Any]
    at: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Exchange:
        data = json.loads(text)
        # Fields added by a newer writer are ignored so a rollback can still drain the outbox.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    request_id: str
    attempts: int
    error: str
    payload: str  # kept raw: a row can be dead precisely because it does not parse

    @property
    def exchange(self) -> Exchange:
        return Exchange.from_json(self.payload)


class _Pending:
    """One append waiting for a group commit; the leader fills in ``seq`` or ``error``."""

    __slots__ = ("request_id", "payload", "seq", "error", "done")

    def __init__(self, request_id: str, payload: str) -> None:
        self.request_id = request_id
        self.payload = payload
        self.seq = 0
        self.error: BaseException | None = None
        self.done = False


class Outbox:
    """A durable FIFO of exchanges in one SQLite file.

    Thread model: one connection, guarded by ``_lock``. Every call is a short
    statement, so serialising them costs little, and one connection means no
    ``SQLITE_BUSY`` between our own threads. Appends use group commit: callers queue
    their row, then whoever takes the lock first commits every queued row in one
    transaction (one fsync), so concurrent appends share the fsync instead of
    waiting in line for one each.

    Only appends need ``synchronous=FULL``: losing an ack, a retry count or a
    dead-letter move to power loss just replays an exchange, which the handler
    tolerates, so those commit with ``NORMAL`` (no fsync). A later FULL commit
    fsyncs the WAL, and with it every earlier frame.
    """

    def __init__(self, path: Path, *, max_attempts: int = 5,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        # Autocommit mode: transactions are explicit BEGIN/COMMIT below.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._closed = False
        self._last_seq = self._stored_last_seq()
        self._unlimited_pages = int(self._db.execute("PRAGMA max_page_count").fetchone()[0])
        #: False from a failed append (a full disk) until one succeeds again: callers
        #: that must answer before they append (a stream's headers) read it.
        self.writable = True
        self._appenders = ThreadPoolExecutor(_APPEND_THREADS, thread_name_prefix="outbox-append")
        fsync_dir(self.path.parent)  # the -wal file's directory entry must survive too

    def limit_size(self, max_bytes: int | None) -> None:
        """Refuse appends that would grow the file past ``max_bytes`` (None: no limit).

        Appends past it fail with SQLite's own "database or disk is full", as on a full
        disk, so this is also how tests provoke one. The file never shrinks below what
        it holds: a limit under its size refuses every append that needs a new page.
        """
        with self._lock:
            self._check_open()
            page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            pages = self._unlimited_pages if max_bytes is None else max(1, max_bytes // page)
            self._db.execute(f"PRAGMA max_page_count = {int(pages)}")

    # -- appending --------------------------------------------------------------------

    async def append(self, exchange: Exchange) -> int:
        """Store ``exchange`` durably and return its seq.

        A request id still in the outbox is not stored twice: its existing seq comes
        back. One already handled and acked is stored again and replayed, which the
        idempotent handler absorbs.
        """
        # Threads of its own: under load the shared default pool is full of recall work,
        # and a stream's [DONE] waits for this append. Several, so commits group.
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._appenders, self.append_blocking, exchange)

    def append_blocking(self, exchange: Exchange) -> int:
        pending = _Pending(exchange.request_id, exchange.to_json())
        with self._queue_lock:
            self._queue.append(pending)
        with self._lock:
            # A leader that held the lock before us may already have committed our row.
            if not pending.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
        if pending.error is not None:
            raise pending.error
        return pending.seq

    def _commit_group(self, group: list[_Pending]) -> None:
        try:
            self._check_open()
            now = self.clock()
            self._db.execute("BEGIN IMMEDIATE")
            for p in group:
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox (request_id, payload, next_attempt_at, created_at)"
                    " VALUES (?, ?, ?, ?)", (p.request_id, p.payload, now, now))
                row = self._db.execute(
                    "SELECT seq FROM outbox WHERE request_id = ?", (p.request_id,)).fetchone()
                p.seq = row[0]
            self._db.execute("COMMIT")
            self._last_seq = max([self._last_seq, *(p.seq for p in group)])
            self.writable = True
        except BaseException as exc:
            # SQLite rolls back by itself on a full disk; otherwise we do.
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, (sqlite3.Error, OSError)):
                self.writable = False
            # Every row in the group shares the failed transaction, so every caller hears of it.
            for p in group:
                p.error = exc
            raise
        finally:
            for p in group:
                p.done = True
        if len(group) > 1:
            log.debug("outbox group commit of %s appends", len(group))

    # -- draining ---------------------------------------------------------------------

    def claim(self, limit: int) -> list[tuple[int, Exchange]]:
        """Up to ``limit`` due exchanges, oldest first. One worker per outbox: no lease."""
        rows = self._read(
            "SELECT seq, payload FROM outbox WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?",
            (self.clock(), limit))
        claimed: list[tuple[int, Exchange]] = []
        for seq, payload in rows:
            try:
                claimed.append((seq, Exchange.from_json(payload)))
            except (ValueError, TypeError) as exc:
                # An unreadable row would otherwise be claimed, and fail, forever.
                log.error("outbox row %s is unreadable (%s); moved to dead", seq, type(exc).__name__)
                self.retry_later(seq, 0.0, f"unreadable payload: {type(exc).__name__}: {exc}",
                                 max_attempts=0)
        return claimed

    def ack(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        with self._tx():
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def attempts(self, seq: int) -> int:
        rows = self._read("SELECT attempts FROM outbox WHERE seq = ?", (seq,))
        return int(rows[0][0]) if rows else 0

    def retry_later(self, seq: int, delay_s: float, error: str, *,
                    max_attempts: int | None = None) -> bool:
        """Count a failed attempt; past ``max_attempts`` move the row to ``dead``.

        Returns True when the row was dead-lettered.
        """
        limit = self.max_attempts if max_attempts is None else max_attempts
        now = self.clock()
        with self._tx():
            row = self._db.execute(
                "SELECT request_id, payload, attempts, created_at FROM outbox WHERE seq = ?",
                (seq,)).fetchone()
            if row is None:
                return False
            request_id, payload, attempts, created_at = row
            attempts += 1
            if attempts >= limit:
                self._db.execute(
                    "INSERT OR REPLACE INTO dead (seq, request_id, payload, attempts, error,"
                    " created_at, died_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, request_id, payload, attempts, error, created_at, now))
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                return True
            self._db.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE seq = ?",
                (attempts, now + delay_s, error, seq))
            return False

    # -- inspection -------------------------------------------------------------------

    def pending_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM outbox", ())[0][0])

    def dead_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM dead", ())[0][0])

    def dead(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._read(
            "SELECT seq, request_id, attempts, error, payload FROM dead ORDER BY seq LIMIT ?",
            (limit,))
        return [DeadLetter(*row) for row in rows]

    def last_seq(self) -> int:
        """The highest seq ever assigned (acked rows included); 0 for a new outbox.

        Kept in memory (one process appends to an outbox), so it is cheap enough to
        read on the event loop: :meth:`WriteBackWorker.flush` takes its watermark
        before its first await.
        """
        return self._last_seq

    def low_water(self) -> int:
        """The lowest pending seq, or one past ``last_seq()`` when nothing is pending.

        Every seq below it has been handled. Both values are read under the lock that
        appends commit under, so an append cannot slip in between them.
        """
        with self._lock:
            self._check_open()
            low = self._db.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]
            if low is not None:
                return int(low)
            return self._stored_last_seq() + 1

    def next_due_in(self) -> float | None:
        """Seconds until the earliest row is due (0 if one is due now), None if empty."""
        value = self._read("SELECT MIN(next_attempt_at) FROM outbox", ())[0][0]
        return None if value is None else max(0.0, float(value) - self.clock())

    def close(self) -> None:
        self._appenders.shutdown(wait=True)
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # -- plumbing ---------------------------------------------------------------------

    def _stored_last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"outbox {self.path} is closed")

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        with self._lock:
            self._check_open()
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """A transaction that may be lost to power loss (not to a crash): see the class doc."""
        with self._lock:
            self._check_open()
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                self._db.execute("PRAGMA synchronous=FULL")


def exponential_backoff(attempts: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Delay before retry number ``attempts`` (1-based): 1s, 2s, 4s ... up to ``cap``."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


class WriteBackWorker:
    """Drains an :class:`Outbox` into a batch handler, on the running event loop.

    The handler gets up to ``batch_size`` exchanges in seq order. If a batch raises,
    its items are retried one by one at once, so a single poison exchange cannot hold
    back the others; each single failure counts an attempt and waits ``backoff``, and
    an exchange failing ``max_attempts`` times goes to the dead table. An exchange that
    has failed alone stays a suspect and is only ever handled alone afterwards, so it
    cannot sink a fresh batch on each retry.

    A failure is only held against an exchange when ``probe`` says the destination is
    fine. When the probe fails too, the destination is down (an outage, not a bad
    exchange): nothing is counted, the worker stops taking batches, and probes again
    with growing pauses (up to ``OUTAGE_PROBE_MAX_S``; at once when a flush asks)
    until the destination answers, then carries on where it stopped. Without a
    probe, a :class:`MemoryUnavailable` from the handler counts as an outage.
    """

    def __init__(self, outbox: Outbox, handle: Handler, *, batch_size: int = 64,
                 max_attempts: int = 5, backoff: Backoff = exponential_backoff,
                 probe: Probe | None = None) -> None:
        self.outbox = outbox
        self.handle = handle
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.probe = probe
        #: True while the destination is down and write-back waits for it.
        self.outage = False
        self._failed_probes = 0  # ever: a flush compares it with what it saw at its start
        self._probe_now: asyncio.Event | None = None
        # Loop-bound primitives are made in start(), on the loop that will use them.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Every seq below this has been handled (acked or dead); None until first measured.
        self._low_water: int | None = None
        self._suspects: set[int] = set()
        # One thread of its own, so write-back keeps pace when recall work fills the
        # default pool (bench/load.py: the backlog grew for as long as load lasted).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="write-back")

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker's own thread (handlers use it for their writes)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start draining, beginning with whatever a previous process left behind."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._progress = asyncio.Condition()
        self._stopping = False
        self._low_water = None
        self._task = self._loop.create_task(self._run(), name="outbox-writeback")

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in hand and stop; the rest stays in the outbox for next time.

        Past ``timeout`` the batch is cancelled; it is replayed on the next start.
        """
        task = self._task
        if task is None:
            return
        self._stopping = True
        self.notify()
        self._probe_soon()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            log.warning("outbox worker cancelled after %ss; its batch will be replayed", timeout)
        finally:
            self._task = None
            await self._announce()

    def notify(self) -> None:
        """Wake the worker (after an append). Safe from any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            wake.set()
        else:
            with suppress(RuntimeError):  # the loop closed under us: nothing left to wake
                loop.call_soon_threadsafe(wake.set)

    def _probe_soon(self) -> None:
        """End an outage's pause now (a flush wants an answer). On the worker's loop."""
        if self._probe_now is not None:
            self._probe_now.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every exchange appended before this call is acked or dead.

        Appends made while waiting do not hold it up: it waits on the seq watermark
        taken when the coroutine starts, not on the outbox being empty. Raises
        ``TimeoutError`` past ``timeout``, ``RuntimeError`` if the worker is not
        running or stops first, and :class:`MemoryUnavailable` when the destination is
        down (a probe made after this call failed): waiting for it could take hours.
        """
        target = self.outbox.last_seq()
        if not self.running or self._progress is None:
            raise RuntimeError("the write-back worker is not running")
        progress = self._progress
        failed_before = self._failed_probes
        self.notify()
        self._probe_soon()

        def reached() -> bool:
            return self._low_water is not None and self._low_water > target

        def down() -> bool:
            return self._failed_probes > failed_before

        async with asyncio.timeout(timeout), progress:
            await progress.wait_for(lambda: reached() or down() or not self.running)
        if reached():
            return
        if down():
            pending = await self.run_blocking(self.outbox.pending_count)
            raise MemoryUnavailable(
                f"The memory store is unavailable: {pending} exchanges wait in the outbox "
                "and will be written back when it returns; try the flush again later.")
        raise RuntimeError("the write-back worker stopped before the flush completed")

    # -- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        failures = 0
        while not self._stopping:
            # Cleared before claiming, so a notify() during the claim is not lost.
            self._wake.clear()
            batch: list[tuple[int, Exchange]] = []
            try:
                batch = await self.run_blocking(self.outbox.claim, self.batch_size)
                if batch:
                    await self._process(batch)
                await self._measure()
                wait = None if batch else await self.run_blocking(self.outbox.next_due_in)
                failures = 0
            except _DestinationDown:
                await self._measure_quietly()
                await self._wait_out_outage()
                continue
            except Exception:
                # The outbox itself failed (disk, closed): back off rather than spin.
                failures += 1
                wait = exponential_backoff(failures, base=0.1, cap=5.0)
                log.exception("outbox worker iteration failed (%s in a row)", failures)
            if batch and wait is None:
                continue  # more may be due right away
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _process(self, batch: list[tuple[int, Exchange]]) -> None:
        run: list[tuple[int, Exchange]] = []
        for item in batch:
            if item[0] in self._suspects:
                await self._handle_run(run)
                run = []
                await self._handle_run([item])
            else:
                run.append(item)
        await self._handle_run(run)

    async def _handle_run(self, run: list[tuple[int, Exchange]]) -> None:
        if not run:
            return
        try:
            await self.handle([exchange for _, exchange in run])
        except Exception as exc:
            await self._check_destination(exc)
            if len(run) == 1:
                await self._failed(*run[0], exc)
                return
            log.warning("write-back batch of %s failed (%s); retrying one by one",
                        len(run), type(exc).__name__)
            for seq, exchange in run:
                if self._stopping:
                    return  # the rest stays due and is retried on the next start
                try:
                    await self.handle([exchange])
                except Exception as item_exc:
                    await self._check_destination(item_exc)
                    await self._failed(seq, exchange, item_exc)
                else:
                    await self.run_blocking(self.outbox.ack, [seq])
            return
        await self.run_blocking(self.outbox.ack, [seq for seq, _ in run])
        self._suspects.difference_update(seq for seq, _ in run)

    async def _check_destination(self, exc: Exception) -> None:
        """Raise :class:`_DestinationDown` when the failure is the destination's, so that
        it is not counted against the exchange."""
        if self.probe is None:
            if isinstance(exc, MemoryUnavailable):
                self._failed_probes += 1
                raise _DestinationDown from exc
            return
        try:
            await self.probe()
        except Exception as probe_exc:
            self._failed_probes += 1
            raise _DestinationDown from probe_exc

    async def _wait_out_outage(self) -> None:
        assert self._probe_now is not None
        self.outage = True
        await self._announce()  # a flush waiting on progress hears of the failed probe
        pending = await self._pending_quietly()
        log.warning("memory store unavailable: write-back paused with %s exchanges pending; "
                    "probing until it returns", pending)
        pause = 0.25
        while not self._stopping:
            # Cleared after the wait, not before: a flush asking during a probe is heard.
            with suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), pause)
            self._probe_now.clear()
            if self._stopping:
                break
            try:
                if self.probe is not None:
                    await self.probe()
            except Exception as exc:
                self._failed_probes += 1
                await self._announce()
                log.debug("memory store still unavailable: %s", type(exc).__name__)
                pause = min(OUTAGE_PROBE_MAX_S, pause * 2)
                continue
            log.info("memory store available again: write-back resumes")
            break
        self.outage = False

    async def _pending_quietly(self) -> int | None:
        try:
            return await self.run_blocking(self.outbox.pending_count)
        except Exception:
            return None

    async def _measure_quietly(self) -> None:
        # Exchanges written back before the outage count for a flush waiting now.
        with suppress(Exception):
            await self._measure()

    async def _failed(self, seq: int, exchange: Exchange, exc: Exception) -> None:
        # The error text is kept in the outbox for operators; logs carry only its type,
        # since handler errors can quote message contents.
        error = f"{type(exc).__name__}: {exc}"[:2000]

        def record() -> tuple[bool, int]:
            attempts = self.outbox.attempts(seq) + 1
            dead = self.outbox.retry_later(seq, self.backoff(attempts), error,
                                           max_attempts=self.max_attempts)
            return dead, attempts

        dead, attempts = await self.run_blocking(record)
        if dead:
            self._suspects.discard(seq)
        else:
            self._suspects.add(seq)
        if dead:
            log.error("write-back of request %s (seq %s) dead after %s attempts: %s",
                      exchange.request_id, seq, attempts, type(exc).__name__)
        else:
            log.warning("write-back of request %s (seq %s) failed, attempt %s: %s",
                        exchange.request_id, seq, attempts, type(exc).__name__)

    async def _measure(self) -> None:
        low = await self.run_blocking(self.outbox.low_water)
        if low != self._low_water:
            self._low_water = low
            await self._announce()

    async def _announce(self) -> None:
        if self._progress is not None:
            async with self._progress:
                self._progress.notify_all()


class _DestinationDown(Exception):
    """The handler failed because its destination is down: pause, count nothing."""
