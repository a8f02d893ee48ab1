"""Stored responses (``store: true``): kept durably per tenant and user in SQLite under
``data_dir``, so ``previous_response_id`` continues a conversation on any backend, and
``GET``/``DELETE /v1/responses/{id}`` and ``input_items`` answer.

A record holds the response object, its input items and the conversation up to and
including it as chat messages (what a continuation sends before its new input).
Records expire after ``responses.retention_days``; a user's purge erases theirs. Every
read is scoped by tenant (and user where one is named): another tenant's id is not
found. Calls block; the routes run them off the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_owner ON responses (tenant, user);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""
#: Expired records are swept at most this often (seconds), on a write.
SWEEP_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    tenant: str
    user: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    #: The conversation up to and including this response, as chat messages.
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, path: Path, retention_days: float) -> None:
        self.path = path
        self.retention = retention_days * 86400.0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._swept = 0.0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # Survives the process dying (WAL); an OS crash may lose the last moments. Stored
        # responses are the client's conversation state, not memory (the outbox, which
        # must never lose an acknowledged exchange, syncs every write): an fsync per
        # response would cost more than the whole relay (bench/overhead.py).
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        self.sweep()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    def save(self, record: StoredResponse) -> None:
        stamp = time.time()
        with self._lock:
            db = self._conn()
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.tenant, record.user, stamp, stamp + self.retention,
                 _dump(record.response), _dump(record.input_items), _dump(record.conversation)))
            if stamp - self._swept > SWEEP_EVERY:
                self._sweep(db, stamp)

    def get(self, tenant: str, response_id: str, user: str | None = None) -> StoredResponse | None:
        """The record, if it belongs to ``tenant`` (and ``user``, when given) and has not
        expired."""
        query = ("SELECT id, tenant, user, response, input_items, conversation FROM responses "
                 "WHERE id = ? AND tenant = ? AND expires_at > ?")
        args: list[Any] = [response_id, tenant, time.time()]
        if user is not None:
            query += " AND user = ?"
            args.append(user)
        with self._lock:
            row = self._conn().execute(query, args).fetchone()
        if row is None:
            return None
        return StoredResponse(id=row[0], tenant=row[1], user=row[2], response=json.loads(row[3]),
                              input_items=json.loads(row[4]), conversation=json.loads(row[5]))

    def delete(self, tenant: str, response_id: str, user: str | None = None) -> bool:
        query = "DELETE FROM responses WHERE id = ? AND tenant = ?"
        args = [response_id, tenant]
        if user is not None:
            query += " AND user = ?"
            args.append(user)
        with self._lock:
            return self._conn().execute(query, args).rowcount > 0

    def purge_user(self, tenant: str, user: str) -> int:
        with self._lock:
            cursor = self._conn().execute(
                "DELETE FROM responses WHERE tenant = ? AND user = ?", (tenant, user))
            return cursor.rowcount

    def sweep(self) -> int:
        """Erase expired records now; how many."""
        with self._lock:
            return self._sweep(self._conn(), time.time())

    def _sweep(self, db: sqlite3.Connection, stamp: float) -> int:
        self._swept = stamp
        return db.execute("DELETE FROM responses WHERE expires_at <= ?", (stamp,)).rowcount

    def count(self) -> int:
        with self._lock:
            row = self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()
        return int(row[0])


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
