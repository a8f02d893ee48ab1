"""The memory seam: recall runs before the backend, remember once the reply is complete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memory.layer import Recall, Turn
from proxy.app import create_app
from proxy.settings import AuthSettings, TenantConfig
from proxy.testing.fake_upstream import FakeUpstream, Status, Stream, chunk
from proxy.testing.live import Live, serve
from tests.conftest import upstream_settings


class RecordingMemory:
    """Injects one memory and records every write-back."""

    def __init__(self) -> None:
        self.recalled: list[Turn] = []
        self.remembered: list[tuple[Turn, list[dict[str, Any]], str | None]] = []

    async def recall(self, turn: Turn, messages: list[dict[str, Any]]) -> Recall:
        self.recalled.append(turn)
        injected = [{"role": "system", "content": "<memories>likes tea</memories>"}, *messages]
        return Recall(messages=injected, memory_ids=["m1", "m2"])

    async def remember(self, turn: Turn, messages: list[dict[str, Any]],
                       reply: str | None) -> None:
        self.remembered.append((turn, messages, reply))


@pytest.fixture
def memory() -> RecordingMemory:
    return RecordingMemory()


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream, memory: RecordingMemory) -> Iterator[Live]:
    settings = upstream_settings(tmp_path, upstream).model_copy(update={
        "auth": AuthSettings(enabled=True),
        "tenants": [TenantConfig(id="acme", api_keys=["sk-acme"])],
    })
    with serve(create_app(settings, memory=memory)) as server:
        yield server


def post(live: Live, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{live.base_url}/chat/completions", json=body,
                      headers={"authorization": "Bearer sk-acme", **headers})


MESSAGES = [{"role": "user", "content": "what do I like?"}]


def test_injected_messages_reach_upstream_and_ids_are_in_header(
        live: Live, upstream: FakeUpstream, memory: RecordingMemory) -> None:
    r = post(live, {"model": "up", "messages": MESSAGES})
    assert r.status_code == 200
    assert r.headers["x-memcube-memories"] == "m1,m2"
    assert r.headers["x-memcube-activation"] == "none"
    assert upstream.history[-1].body["messages"][0]["content"] == "<memories>likes tea</memories>"
    turn, messages, reply = memory.remembered[-1]
    assert messages == MESSAGES  # the client's messages, not the injected ones
    assert reply == "Hello from the fake upstream."


def test_turn_carries_tenant_user_session_and_options(live: Live,
                                                      memory: RecordingMemory) -> None:
    post(live, {"model": "up", "messages": MESSAGES, "user": "body-user",
                "memory": {"top_k": 3, "write": False}},
         **{"x-memcube-user": "header-user", "x-memcube-session": "s-1"})
    turn = memory.recalled[-1]
    assert (turn.tenant, turn.user, turn.session_id, turn.model) == \
        ("acme", "header-user", "s-1", "up")
    assert turn.options == {"enabled": True, "write": False, "top_k": 3}
    assert len(turn.request_id) == 32


@pytest.mark.parametrize(("body_user", "expected"), [("body-user", "body-user"), (None, "default")])
def test_user_falls_back_to_body_then_default(live: Live, memory: RecordingMemory,
                                              body_user: str | None, expected: str) -> None:
    body: dict[str, Any] = {"model": "up", "messages": MESSAGES}
    if body_user:
        body["user"] = body_user
    post(live, body)
    assert memory.recalled[-1].user == expected
    assert memory.recalled[-1].session_id is None


def test_stream_remembers_the_whole_reply_before_done(live: Live,
                                                      memory: RecordingMemory) -> None:
    with httpx.stream("POST", f"{live.base_url}/chat/completions",
                      json={"model": "up", "messages": MESSAGES, "stream": True},
                      headers={"authorization": "Bearer sk-acme"}) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                # Written back before the response ended.
                assert memory.remembered[-1][2] == "Hello from the fake upstream."


def test_stream_error_remembers_user_turn_only(live: Live, upstream: FakeUpstream,
                                               memory: RecordingMemory) -> None:
    upstream.enqueue(Stream([chunk("half")], cut=True))
    r = post(live, {"model": "up", "messages": MESSAGES, "stream": True})
    assert r.text.endswith("data: [DONE]\n\n")
    assert memory.remembered[-1][2] is None


def test_failed_request_is_not_remembered(live: Live, upstream: FakeUpstream,
                                          memory: RecordingMemory) -> None:
    upstream.enqueue(Status(500))
    assert post(live, {"model": "up", "messages": MESSAGES}).status_code == 502
    assert memory.remembered == []
