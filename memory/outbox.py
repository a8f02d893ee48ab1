"""The durable write-back outbox: a FIFO of chat exchanges that survives crashes.

Job: keep every exchange the proxy appends until it is acked or dead-lettered; the
worker that drains it (:mod:`memory.writeback`) decides which. Guarantee: an appended
exchange survives ``kill -9`` (and, with ``synchronous=FULL``, power loss) from the
moment :meth:`Outbox.append` returns, and nothing leaves the outbox silently: a row
is deleted by an ack, or moved with its error to the ``dead`` table once it has
failed ``max_attempts`` times. Delivery is at-least-once: a crash between the handler
finishing and the ack replays the exchange, so the handler must be idempotent.

Rows live in SQLite (WAL). ``seq`` is AUTOINCREMENT so it is never reused, which lets
a flush wait on a watermark: everything appended before it has ``seq <= last_seq()``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.fsutil import fsync_dir
from memory.layer import Exchange

log = logging.getLogger(__name__)

_APPEND_THREADS = 4

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
        read on the event loop: :meth:`memory.writeback.WriteBackWorker.flush` takes
        its watermark before its first await.
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
