"""The process that tests/test_outbox.py kills with SIGKILL: an outbox, a worker, a store.

    python -m tests.outbox_crash_child produce OUTBOX STORE N [DIE_AFTER]
    python -m tests.outbox_crash_child recover OUTBOX STORE

``produce`` appends N exchanges from a few concurrent callers and prints
``ack <request_id>`` once each append has returned (the proxy would now end the
response), ``handled <request_id>`` after the store write and ``acked <count>`` after
the outbox ack; then ``done`` once all is handled, and it waits for the parent's kill,
so the parent, not a race, decides when it dies. With DIE_AFTER it SIGKILLs itself
inside the handler after that many store writes, before the ack: a replay is then
certain. ``recover`` only runs the worker until everything left behind is handled,
then prints the outbox's counts.

The store stands in for the vector store: ``items`` is keyed by a deterministic id
(an upsert, as the real handler's point ids are), ``calls`` counts every delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from memory.layer import Exchange
from memory.outbox import Outbox
from memory.writeback import WriteBackWorker

CALLERS = 4
BATCH = 8


def say(line: str) -> None:
    # One write per line, so a kill leaves whole lines or none in the pipe.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class LoudOutbox(Outbox):
    def ack(self, seqs: Sequence[int]) -> None:
        super().ack(seqs)
        say(f"acked {len(seqs)}")


class Store:
    def __init__(self, path: Path, die_after: int | None) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, request_id TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS calls (n INTEGER PRIMARY KEY, request_id TEXT)")
        self.die_after = die_after
        self.writes = 0

    def write(self, batch: list[Exchange]) -> None:
        self.db.execute("BEGIN")
        for exchange in batch:
            point = hashlib.sha256(exchange.request_id.encode()).hexdigest()[:32]
            self.db.execute("INSERT OR REPLACE INTO items VALUES (?, ?)", (point, exchange.request_id))
            self.db.execute("INSERT INTO calls (request_id) VALUES (?)", (exchange.request_id,))
        self.db.execute("COMMIT")
        for exchange in batch:
            say(f"handled {exchange.request_id}")
        self.writes += len(batch)
        if self.die_after is not None and self.writes >= self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    async def handle(self, batch: list[Exchange]) -> None:
        await asyncio.to_thread(self.write, batch)


def exchange(rid: str) -> Exchange:
    return Exchange(request_id=rid, tenant="t", user="u", session_id="s", model="m",
                    messages=[{"role": "user", "content": f"message {rid}"}], reply="ok",
                    options={}, at=0)


async def produce(outbox: Outbox, worker: WriteBackWorker, n: int) -> None:
    async def caller(index: int) -> None:
        for i in range(index, n, CALLERS):
            rid = f"req-{i:05d}"
            await outbox.append(exchange(rid))
            say(f"ack {rid}")
            worker.notify()

    await asyncio.gather(*(caller(c) for c in range(CALLERS)))
    await worker.flush(timeout=60)
    say("done")


async def main(argv: list[str]) -> None:
    mode, outbox_path, store_path = argv[0], Path(argv[1]), Path(argv[2])
    die_after = int(argv[4]) if mode == "produce" and len(argv) > 4 else None
    store = Store(store_path, die_after)
    outbox = LoudOutbox(outbox_path)
    worker = WriteBackWorker(outbox, store.handle, batch_size=BATCH)
    worker.start()
    if mode == "produce":
        await produce(outbox, worker, int(argv[3]))
    else:
        await worker.flush(timeout=60)
        say(f"recovered pending={outbox.pending_count()} dead={outbox.dead_count()}")
    await worker.stop(timeout=10)
    outbox.close()
    if mode == "produce":
        sys.stdin.read()  # until the parent's SIGKILL (or it closes our stdin)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
