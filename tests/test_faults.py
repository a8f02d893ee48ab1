"""Faults in memory's dependencies, through real HTTP: the proxy keeps answering.

Real components throughout: uvicorn on loopback, the scripted fake upstream, real
Qdrant Edge on disk behind :class:`memory.store.faulty.FaultyStore` (which makes it
fail on demand: ``down``, or ``read-only``), the real MiniLM embedder, and the real
SQLite outbox, filled up with its own size limit (SQLite's "database or disk is
full"). What is pinned:

- chat answers 200 without memory and names what it did without in
  ``X-Memcube-Degraded`` (``recall``, ``write-back``, ``write-back-delayed``);
- the memory API answers an OpenAI-shaped 503 ``memory_unavailable``, never a 500;
- write-backs wait out an outage without spending their retries, and once the store
  returns every acknowledged exchange is stored exactly once;
- an exchange the outbox refused is reported as not recorded (a header, or at the
  end of a stream an SSE comment) and is never stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from memory.embedding.minilm import MiniLMEmbedder
from memory.errors import MemoryUnavailable
from memory.outbox import Outbox
from memory.service import MemoryService
from memory.store.edge import EdgeStore
from memory.store.faulty import FaultyStore
from proxy.app import create_app
from proxy.settings import EmbedderSettings, MemorySettings, QdrantSettings
from proxy.testing.fake_upstream import FakeUpstream, Stream, chunk
from proxy.testing.live import Live, refused_port, serve
from tests.conftest import upstream_settings

DEGRADED = "x-memcube-degraded"


@pytest.fixture(scope="module")
def embedder(model_cache: Path) -> Iterator[MiniLMEmbedder]:
    emb = MiniLMEmbedder(model_cache)
    yield emb
    emb.close()


@dataclass
class Rig:
    live: Live
    store: FaultyStore
    service: MemoryService
    outbox: Outbox

    def chat(self, text: str, *, user: str = "alice", stream: bool = False,
             **extra: Any) -> httpx.Response:
        body = {"model": "up", "messages": [{"role": "user", "content": text}],
                "stream": stream, **extra}
        return httpx.post(f"{self.live.base_url}/chat/completions", json=body, timeout=30,
                          headers={"x-memcube-user": user})

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.live.base_url}{path}", timeout=30, **kw)

    def texts(self, user: str = "alice") -> list[str]:
        r = self.api("GET", "/memories", params={"user": user, "limit": 1000})
        assert r.status_code == 200, r.text
        return sorted(item["text"] for item in r.json()["data"])

    def flush_raises_unavailable(self) -> None:
        """Wait, on the server's loop, until the worker has met the outage."""
        with pytest.raises(MemoryUnavailable):
            self.live.call(self.service.flush())


@pytest.fixture
def rig(tmp_path: Path, upstream: FakeUpstream, embedder: MiniLMEmbedder) -> Iterator[Rig]:
    edge = EdgeStore(tmp_path / "qdrant", embedding_model=embedder.model_id, dim=embedder.dim,
                     also_accept=embedder.same_space)
    store = FaultyStore(edge)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    service = MemoryService(store=store, embedder=embedder, outbox=outbox)
    with serve(create_app(upstream_settings(tmp_path, upstream), memory=service)) as live:
        live.call(service.start())
        try:
            yield Rig(live, store, service, outbox)
        finally:
            store.mode = "ok"
            live.call(service.stop())
    outbox.close()
    store.close()


def assert_memory_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("api_error", None, "memory_unavailable")
    assert "unavailable" in err["message"]


def sse(r: httpx.Response) -> list[str]:
    """Every non-empty line of an event stream: data frames and comments."""
    return [line for line in r.text.split("\n") if line]


# -- the store is down ----------------------------------------------------------------


def test_store_down_chat_answers_without_memory_and_says_recall(rig: Rig,
                                                                upstream: FakeUpstream) -> None:
    rig.store.mode = "down"
    r = rig.chat("My cat is called Miso.")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert r.headers[DEGRADED] == "recall"
    assert r.headers["x-memcube-memories"] == ""
    assert upstream.history[-1].body["messages"] == [
        {"role": "user", "content": "My cat is called Miso."}]  # nothing injected
    assert rig.store.refused > 0  # the fault was met, not skipped

    rig.flush_raises_unavailable()  # the worker has tried, probed and paused
    rs = rig.chat("What is my cat called?", stream=True)
    assert rs.status_code == 200
    assert rs.headers[DEGRADED] == "recall,write-back-delayed"
    assert sse(rs)[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in sse(rs))


def test_store_healthy_sends_no_degraded_header(rig: Rig) -> None:
    r = rig.chat("hello")
    assert r.status_code == 200
    assert DEGRADED not in r.headers
    rs = rig.chat("hello again", stream=True)
    assert DEGRADED not in rs.headers
    assert ": x-memcube-degraded write-back" not in sse(rs)


def test_write_backs_wait_out_an_outage_and_land_exactly_once(rig: Rig) -> None:
    said = [f"Fact number {n}: my locker code word is {w}."
            for n, w in enumerate(["apple", "birch", "cedar", "delta", "ember", "fjord"])]
    rig.store.mode = "down"
    for n, text in enumerate(said):
        assert rig.chat(text, stream=n % 2 == 1).status_code == 200
    rig.flush_raises_unavailable()
    rig.flush_raises_unavailable()  # each flush probes again: still down, still nothing spent
    assert rig.service.worker.outage is True
    assert rig.outbox.pending_count() == len(said)
    assert [rig.outbox.attempts(seq) for seq in range(1, len(said) + 1)] == [0] * len(said)
    assert rig.outbox.dead_count() == 0

    rig.store.mode = "ok"
    r = rig.api("POST", "/memories/flush")
    assert r.status_code == 200
    assert r.json() == {"object": "memory.flush", "flushed": True}
    assert rig.service.worker.outage is False
    assert rig.texts() == sorted(said)
    assert rig.outbox.pending_count() == 0
    assert rig.outbox.dead_count() == 0
    # A flush more writes nothing twice.
    assert rig.api("POST", "/memories/flush").status_code == 200
    assert rig.texts() == sorted(said)


def test_outage_in_the_middle_of_a_batch_spends_nothing(rig: Rig) -> None:
    """The store fails as the worker writes (not before): the batch is not split into
    single retries that each count an attempt."""
    rig.store.mode = "read-only"
    for n in range(4):
        assert rig.chat(f"Note {n}: the meeting room is on floor {n + 3}.").status_code == 200
    rig.flush_raises_unavailable()
    assert [rig.outbox.attempts(seq) for seq in range(1, 5)] == [0, 0, 0, 0]
    rig.store.mode = "ok"
    rig.live.call(rig.service.flush())
    assert len(rig.texts()) == 4


def test_read_only_store_recalls_and_delays_write_back(rig: Rig, upstream: FakeUpstream) -> None:
    r = rig.api("POST", "/memories", json={"text": "My dog is called Biscuit.", "user": "alice"})
    assert r.status_code == 200
    seeded = r.json()["id"]
    rig.store.mode = "read-only"

    r = rig.chat("What is my dog called?")
    assert r.status_code == 200
    assert r.headers["x-memcube-memories"] == seeded  # reads still work
    assert "Biscuit" in upstream.history[-1].body["messages"][0]["content"]
    assert DEGRADED not in r.headers  # nothing failed yet: the worker has not tried

    rig.flush_raises_unavailable()
    r = rig.chat("Biscuit likes long walks.")
    assert r.headers[DEGRADED] == "write-back-delayed"
    assert rig.api("GET", f"/memories/{seeded}").status_code == 200

    rig.store.mode = "ok"
    assert rig.api("POST", "/memories/flush").status_code == 200
    assert rig.texts() == ["Biscuit likes long walks.", "My dog is called Biscuit.",
                           "What is my dog called?"]
    assert rig.outbox.dead_count() == 0


@pytest.mark.parametrize("mode", ["down", "read-only"])
def test_memory_api_answers_503_while_the_store_fails(rig: Rig, mode: str) -> None:
    made = rig.api("POST", "/memories", json={"text": "I sail on Sundays.", "user": "alice"})
    assert made.status_code == 200
    memory_id = made.json()["id"]
    rig.store.mode = mode  # type: ignore[assignment]
    writes = [
        rig.api("POST", "/memories", json={"text": "I row on Mondays.", "user": "alice"}),
        rig.api("PATCH", f"/memories/{memory_id}", json={"pinned": True}),
        rig.api("DELETE", f"/memories/{memory_id}"),
        rig.api("POST", "/cubes", json={"name": "team", "id": "team"}),
    ]
    reads = [
        rig.api("GET", "/memories", params={"user": "alice"}),
        rig.api("GET", f"/memories/{memory_id}"),
        rig.api("GET", f"/memories/{memory_id}/history"),
        rig.api("POST", "/memories/search", json={"query": "sailing", "user": "alice"}),
        rig.api("GET", "/cubes"),
    ]
    for r in writes:
        assert_memory_unavailable(r)
    for r in reads:
        if mode == "down":
            assert_memory_unavailable(r)
        else:
            assert r.status_code == 200, r.text
    assert rig.chat("I also swim.").status_code == 200
    assert_memory_unavailable(rig.api("POST", "/memories/flush"))


# -- the outbox is full ---------------------------------------------------------------

# Bigger than a page, so that storing it needs pages a full file cannot get.
BIG = "Here is my long travel diary. " + "We walked along the river and talked. " * 400


def test_full_outbox_answers_but_says_the_exchange_was_not_recorded(rig: Rig) -> None:
    rig.outbox.limit_size(0)  # no room to grow: SQLite says "database or disk is full"

    # A stream's headers leave before its exchange is appended: its end says so.
    first = rig.chat(BIG, stream=True)
    assert first.status_code == 200
    assert DEGRADED not in first.headers  # the outbox had not failed yet
    lines = sse(first)
    assert lines[-2:] == [": x-memcube-degraded write-back", "data: [DONE]"]
    assert "Hello" in "".join(lines)

    r = rig.chat(BIG)
    assert r.status_code == 200
    assert r.headers[DEGRADED] == "write-back"
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."

    # Once the outbox has failed, a stream's headers say so before it starts.
    rs = rig.chat(BIG, stream=True)
    assert rs.headers[DEGRADED] == "write-back"
    assert sse(rs)[-2:] == [": x-memcube-degraded write-back", "data: [DONE]"]

    # OpenAI clients read past the comment.
    client = openai.OpenAI(base_url=rig.live.base_url, api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="up", stream=True, messages=[{"role": "user", "content": BIG}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks
                   if c.choices) == "Hello from the fake upstream."

    rig.outbox.limit_size(None)  # space is back
    r = rig.chat("My bike is green.")
    assert DEGRADED not in r.headers
    assert rig.api("POST", "/memories/flush").status_code == 200
    assert rig.texts() == ["My bike is green."]  # the refused exchanges were never stored


# -- a stream cut by the upstream ----------------------------------------------------


def test_cut_stream_remembers_the_user_turn(rig: Rig, upstream: FakeUpstream) -> None:
    upstream.enqueue(Stream([chunk("", role="assistant"), chunk("I think you")], cut=True))
    r = rig.chat("My favourite colour is teal.", stream=True)
    assert r.status_code == 200
    lines = sse(r)
    assert lines[-1] == "data: [DONE]"
    assert lines[-2].startswith('data: {"error"')
    assert rig.api("POST", "/memories/flush").status_code == 200
    assert rig.texts() == ["My favourite colour is teal."]


# -- a Qdrant server that refuses connections ------------------------------------------


# qdrant-client checks the server's version when it connects, and warns that it cannot.
@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_unreachable_qdrant_server_proxy_serves_without_memory(
        tmp_path: Path, upstream: FakeUpstream, model_cache: Path) -> None:
    """A real network failure: ``qdrant.url`` names a port nothing listens on. The
    proxy starts anyway, answers chat without memory, and the memory API says 503."""
    settings = upstream_settings(tmp_path, upstream).model_copy(update={
        "memory": MemorySettings(embedder=EmbedderSettings(cache_dir=model_cache)),
        "qdrant": QdrantSettings(url=f"http://127.0.0.1:{refused_port()}"),
    })
    with serve(create_app(settings)) as live:
        r = httpx.post(f"{live.base_url}/chat/completions", timeout=30, json={
            "model": "up", "messages": [{"role": "user", "content": "I keep bees."}],
            "user": "alice"})
        assert r.status_code == 200
        assert r.headers[DEGRADED] == "recall"
        assert_memory_unavailable(httpx.get(f"{live.base_url}/memories", timeout=30))
        assert_memory_unavailable(httpx.post(f"{live.base_url}/memories/flush", timeout=30))
        service = live.context.memory_service()
        assert service.outbox.pending_count() == 1  # kept for when the server answers
        assert service.outbox.dead_count() == 0


# -- health -----------------------------------------------------------------------------


def test_healthz_stays_200_and_names_what_memory_lacks(rig: Rig) -> None:
    ok = httpx.get(f"{rig.live.url}/healthz")
    assert ok.status_code == 200
    assert ok.json()["memory"] == {"store": "ok", "outbox": "ok", "write_back": "ok",
                                   "anonymous": "off"}
    rig.store.mode = "down"
    rig.chat("hello")
    rig.flush_raises_unavailable()
    rig.outbox.limit_size(0)
    rig.chat(BIG)
    r = httpx.get(f"{rig.live.url}/healthz")
    assert r.status_code == 200  # liveness: the proxy still answers
    assert r.json()["status"] == "ok"
    assert r.json()["memory"] == {"store": "unavailable", "outbox": "failing",
                                  "write_back": "paused", "anonymous": "off"}


def metric(rig: Rig, line_start: str) -> float:
    text = httpx.get(f"{rig.live.url}/metrics", timeout=30).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(line_start + " ")]
    assert len(values) == 1, f"{line_start} not exported once in:\n{text}"
    return values[0]


def test_metrics_show_the_outage_the_backlog_and_degraded_requests(rig: Rig) -> None:
    assert metric(rig, "memcube_memory_store_up") == 1
    rig.store.mode = "down"
    for n in range(3):
        assert rig.chat(f"Outage note {n}.").status_code == 200
    rig.flush_raises_unavailable()
    assert metric(rig, "memcube_memory_store_up") == 0
    assert metric(rig, "memcube_outbox_pending") == 3
    assert metric(rig, "memcube_outbox_dead") == 0
    assert metric(rig, 'memcube_degraded_requests_total{component="recall"}') == 3
    rig.store.mode = "ok"
    assert rig.api("POST", "/memories/flush").status_code == 200
    assert metric(rig, "memcube_outbox_pending") == 0
    assert metric(rig, "memcube_memory_store_up") == 1
