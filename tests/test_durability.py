"""Durability end to end: ``kill -9`` of a real proxy process under a stream of chats.

The proxy runs as ``python -m proxy.cli serve`` with memory on (Qdrant Edge and MiniLM
under one data directory, fast extraction) and a model relayed to the scripted fake
upstream. Concurrent clients send chats, streamed and not, each with a user turn of
its own; the proxy is killed with SIGKILL after a seeded random number of completed
exchanges (twice instead at a random moment of its start-up, when the worker may be
replaying the previous life's backlog), then started again on the same data directory.
Twelve kills make it likely that one lands between a store write and its outbox ack:
with the write-back made non-idempotent on purpose, 6 runs of 7 stored a turn twice. After the last start
and a flush, every acknowledged exchange's user turn is stored exactly once, the
others at most once, nothing else is stored, and the outbox holds no dead letter.

An exchange is acknowledged when the client has the whole response: a 200 with its
body, or a stream's ``[DONE]`` frame. tests/test_outbox.py kills the outbox alone at
chosen points; this test goes through HTTP, the real worker and the real store.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest

from proxy.testing.fake_upstream import DEFAULT_TEXT, FakeUpstream
from tests.durability_proxy import ProxyProcess, outbox_rows, write_config

pytestmark = pytest.mark.slow

SEED = 20251124
KILLS = 12
CLIENTS = 6
FINAL_TURNS_PER_CLIENT = 5
USERS = ("ana", "ben", "chen")
THINGS = ("cello", "kayak", "lantern", "teapot", "compass", "quilt", "bonsai", "atlas")

Outcome = Literal["pending", "acked", "cut", "refused", "failed"]


@dataclass
class Sent:
    """One chat request and what became of it. ``cut``: in flight when the proxy died;
    ``refused``: sent after it died; ``failed``: anything else (always a bug here)."""

    text: str
    user: str
    stream: bool
    life: int
    outcome: Outcome = "pending"
    request_id: str | None = None
    detail: str = ""


@dataclass
class Life:
    """One run of the proxy, from start to kill (its figures go to the report)."""

    index: int
    kill_after: int | None  # acknowledged exchanges before the kill; None: killed starting up
    delay: float = 0.0  # a startup kill: seconds from spawn to SIGKILL
    acked: int = 0
    cut: int = 0
    refused: int = 0
    backlog: int = 0  # exchanges in the outbox at the kill: not yet written back
    acked_backlog: int = 0  # of those, how many their client had been answered for


def complete_one(sdk: openai.OpenAI, s: Sent) -> None:
    try:
        raw = sdk.chat.completions.with_raw_response.create(
            model="up", messages=[{"role": "user", "content": s.text}],
            extra_headers={"x-memcube-user": s.user})
    except openai.APITimeoutError as exc:  # a live proxy that stops answering is a bug
        s.outcome, s.detail = "failed", repr(exc)
        return
    except openai.APIConnectionError as exc:
        s.outcome = "refused" if isinstance(exc.__cause__, httpx.ConnectError) else "cut"
        return
    except openai.APIStatusError as exc:
        s.outcome, s.detail = "failed", f"{exc.status_code} {exc.response.text[:300]}"
        return
    s.request_id = raw.headers["x-memcube-request-id"]
    content = raw.parse().choices[0].message.content
    s.outcome, s.detail = ("acked", "") if content == DEFAULT_TEXT else ("failed", f"reply {content!r}")


def stream_one(http: httpx.Client, url: str, s: Sent) -> None:
    done = False
    parts: list[str] = []
    body = {"model": "up", "stream": True, "messages": [{"role": "user", "content": s.text}]}
    try:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                         headers={"x-memcube-user": s.user}) as r:
            if r.status_code != 200:
                s.outcome, s.detail = "failed", f"{r.status_code} {r.read()[:300]!r}"
                return
            s.request_id = r.headers["x-memcube-request-id"]
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                frame: dict[str, Any] = json.loads(line[len("data: "):])
                if "error" in frame:
                    s.outcome, s.detail = "failed", line[:300]
                    return
                parts.extend(c["delta"].get("content") or "" for c in frame["choices"])
    except httpx.TimeoutException as exc:
        s.outcome, s.detail = "failed", repr(exc)
        return
    except httpx.ConnectError:
        s.outcome = "refused"
        return
    except httpx.TransportError:
        if not done:  # a cut after [DONE] still leaves the client with the whole reply
            s.outcome = "cut"
            return
    if not done:
        s.outcome, s.detail = "failed", "the stream ended without [DONE]"
    elif "".join(parts) != DEFAULT_TEXT:
        s.outcome, s.detail = "failed", f"reply {''.join(parts)!r}"
    else:
        s.outcome = "acked"


class Load:
    """CLIENTS threads sending chats until stopped (or ``turns`` each), each stopping at
    the first request that is not acknowledged: the proxy is gone by then."""

    def __init__(self, url: str, life: int, sent: list[Sent], turns: int | None = None) -> None:
        self.url, self.life, self.sent, self.turns = url, life, sent, turns
        self.stop = threading.Event()
        self._acked = 0
        self._progress = threading.Condition()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(CLIENTS)]
        for t in self._threads:
            t.start()

    def _client(self, index: int) -> None:
        rng = random.Random(f"{SEED}-{self.life}-{index}")
        sdk = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)
        with httpx.Client(timeout=30) as http:
            turn = 0
            while not self.stop.is_set() and (self.turns is None or turn < self.turns):
                s = Sent(text=f"Life {self.life} client {index} turn {turn}: I keep the "
                              f"{rng.choice(THINGS)} by the door.",
                         user=rng.choice(USERS), stream=rng.random() < 0.5, life=self.life)
                self.sent.append(s)
                try:
                    stream_one(http, self.url, s) if s.stream else complete_one(sdk, s)
                except Exception as exc:  # surfaced by the test, not lost with the thread
                    s.outcome, s.detail = "failed", repr(exc)
                with self._progress:
                    self._acked += s.outcome == "acked"
                    self._progress.notify_all()
                if s.outcome != "acked":
                    return
                turn += 1

    def wait_acked(self, count: int, timeout: float = 60) -> None:
        with self._progress:
            if not self._progress.wait_for(lambda: self._acked >= count, timeout):
                raise TimeoutError(f"only {self._acked} of {count} exchanges acknowledged")

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a client hung"


def list_all(url: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 200}
    while True:
        page = httpx.get(f"{url}/v1/memories", params=params, timeout=60)
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["data"]
        if not body["has_more"]:
            return items
        params["after"] = body["next_after"]


def run_life(config: Path, log: Path, life: Life, sent: list[Sent], jitter: float) -> float | None:
    """Start the proxy, drive it until ``life.kill_after`` acks (or, for a startup kill,
    wait ``life.delay``), then kill -9 it. Returns how long it took to become healthy."""
    proxy = ProxyProcess(config, log)
    try:
        if life.kill_after is None:
            time.sleep(life.delay)  # somewhere in imports, store open, backlog replay
            proxy.kill9()
            return None
        proxy.wait_healthy()
        load = Load(proxy.url, life.index, sent)
        try:
            load.wait_acked(life.kill_after)
            time.sleep(jitter)  # where in its exchange each client is when the kill lands
            proxy.kill9()
        finally:
            load.join()
        return proxy.ready_after
    finally:
        proxy.stop_quietly()


def test_kill_9_keeps_every_acknowledged_exchange_exactly_once(
        tmp_path: Path, upstream: FakeUpstream, model_cache: Path,
        record_property: Callable[[str, object], None]) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "proxy.yaml", data_dir=data_dir, upstream_url=upstream.url,
                          model_cache=model_cache)
    lives = [Life(i, rng.randint(10, 80)) for i in range(KILLS)]
    for startup in (2, 7):  # killed while starting up, maybe mid-replay of the last backlog
        lives[startup].kill_after = None
    sent: list[Sent] = []
    outbox = data_dir / "outbox.sqlite3"
    ready = 1.0
    for life in lives:
        if life.kill_after is None:
            life.delay = rng.uniform(0.5, 1.1) * ready
        ready = run_life(config, tmp_path / f"proxy-{life.index}.log", life, sent,
                         rng.uniform(0.0, 0.03)) or ready
        mine = [s for s in sent if s.life == life.index]
        outcomes = Counter(s.outcome for s in mine)
        life.acked, life.cut, life.refused = outcomes["acked"], outcomes["cut"], outcomes["refused"]
        pending, dead = outbox_rows(outbox)
        assert dead == 0
        life.backlog = len(pending)
        life.acked_backlog = sum(s.outcome == "acked" and s.request_id in pending for s in mine)

    last = ProxyProcess(config, tmp_path / "proxy-last.log")
    try:
        last.wait_healthy()
        final = len(lives)
        load = Load(last.url, final, sent, turns=FINAL_TURNS_PER_CLIENT)
        try:
            load.wait_acked(CLIENTS * FINAL_TURNS_PER_CLIENT)
        finally:
            load.join()
        flushed = httpx.post(f"{last.url}/v1/memories/flush", timeout=120)
        assert flushed.json() == {"object": "memory.flush", "flushed": True}
        items = list_all(last.url)
        status = last.terminate()
    finally:
        last.stop_quietly()

    failed = [(s.text, s.outcome, s.detail) for s in sent if s.outcome not in ("acked", "cut", "refused")]
    assert failed == []
    assert [s.outcome for s in sent if s.life == final] == ["acked"] * CLIENTS * FINAL_TURNS_PER_CLIENT

    by_text = {s.text: s for s in sent}
    stored = Counter(item["text"] for item in items)
    assert [t for t, n in stored.items() if n > 1] == []  # nothing stored twice
    assert set(stored) <= set(by_text)  # nothing but the turns sent
    acked = [s for s in sent if s.outcome == "acked"]
    assert [s.text for s in acked if s.text not in stored] == []  # no acknowledged turn lost
    for item in items:
        s = by_text[item["text"]]
        assert (item["user"], item["type"], item["status"], item["version"]) == (s.user, "raw", "active", 1)
        if s.request_id is not None:
            assert [src["request_id"] for src in item["sources"]] == [s.request_id]

    # A graceful stop after all those crashes, with nothing left pending or dead.
    assert status in (0, -signal.SIGTERM), last.output()
    assert "Application shutdown complete" in last.output()
    assert outbox_rows(outbox) == (set(), 0)
    logs = [p.read_text(errors="replace") for p in sorted(tmp_path.glob("proxy-*.log"))]
    assert [log for log in logs if "Traceback" in log] == []

    # The kills landed where they matter: mid-request, and between an acknowledgement and
    # its write-back.
    assert sum(life.cut for life in lives) >= 1
    assert sum(life.acked_backlog for life in lives) >= 1
    unacked = [s for s in sent if s.outcome != "acked"]
    figures = {"lives": [vars(life) for life in lives], "sent": len(sent), "acked": len(acked),
               "unacked": len(unacked), "unacked_stored": sum(s.text in stored for s in unacked),
               "stored": len(items)}
    record_property("durability", json.dumps(figures))
    print("\n" + json.dumps(figures))


def test_kill_9_while_the_first_start_creates_the_store_leaves_one_the_next_start_opens(
        tmp_path: Path, upstream: FakeUpstream, model_cache: Path) -> None:
    # The first start loads the embedder, then creates the store, then the outbox: a kill
    # just after the embedder's log line lands while the store is being created (some
    # 100-250 ms here), before it is complete. The next start must open it, not refuse it.
    rng = random.Random(SEED)
    mid_creation: list[bool] = []
    for trial, jitter in enumerate([0.0, rng.uniform(0.0, 0.02), rng.uniform(0.0, 0.04)]):
        data_dir = tmp_path / f"trial-{trial}"
        config = write_config(tmp_path / f"proxy-{trial}.yaml", data_dir=data_dir,
                              upstream_url=upstream.url, model_cache=model_cache)
        first = ProxyProcess(config, tmp_path / f"proxy-{trial}-first.log")
        try:
            first.wait_for_log("loaded all-MiniLM-L6-v2")
            time.sleep(jitter)
            first.kill9()
        finally:
            first.stop_quietly()
        mid_creation.append(not (data_dir / "outbox.sqlite3").exists())

        proxy = ProxyProcess(config, tmp_path / f"proxy-{trial}-next.log")
        try:
            proxy.wait_healthy()
            sent = Sent(text=f"After crash {trial} I moved the bonsai.", user="ana", stream=False,
                        life=0)
            complete_one(openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused",
                                       max_retries=0), sent)
            assert (sent.outcome, sent.detail) == ("acked", "")
            flushed = httpx.post(f"{proxy.url}/v1/memories/flush", timeout=60)
            assert flushed.json()["flushed"] is True
            assert [(i["text"], i["user"]) for i in list_all(proxy.url)] == [(sent.text, "ana")]
        finally:
            proxy.stop_quietly()
    assert any(mid_creation), "no kill landed before the store was complete"
