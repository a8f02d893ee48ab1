"""``responses: native``: /v1/responses relayed to an upstream that serves the Responses
API itself, memories first in ``instructions``, reply and events relayed as they came;
write-back, storage and isolation as on translated models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.settings import (
    AuthSettings,
    EmbedderSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream, Status, Stream, response_events
from proxy.testing.live import Live, serve

KEYS = {"acme": "sk-acme", "globex": "sk-globex"}


@pytest.fixture
def native_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(responses=True) as fake:
        yield fake


@pytest.fixture
def live(tmp_path: Path, native_upstream: FakeUpstream, model_cache: Path) -> Iterator[Live]:
    settings = Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="gpt", backend="litellm", model="openai/fake-model",
                            api_base=native_upstream.url, max_retries=0, responses="native")],
        auth=AuthSettings(enabled=True),
        tenants=[TenantConfig(id=t, api_keys=[k]) for t, k in KEYS.items()],
        memory=MemorySettings(embedder=EmbedderSettings(cache_dir=model_cache)),
    )
    with serve(create_app(settings)) as server:
        yield server


def client(live: Live, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=KEYS[tenant], max_retries=0,
                         default_headers={"x-memcube-user": "alice"})


def flush(live: Live) -> None:
    r = httpx.post(f"{live.base_url}/memories/flush", timeout=60,
                   headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.json()["flushed"] is True


def test_relayed_with_memories_in_instructions_and_stored(live: Live,
                                                          native_upstream: FakeUpstream) -> None:
    told = client(live).responses.create(model="gpt", input="My boat is called Kestrel.",
                                         metadata={"k": "v"}, extra_body={"reasoning": {}})
    sent = native_upstream.history[-1]
    assert sent.path.endswith("/responses") and sent.body["model"] == "fake-model"
    assert sent.body["input"] == "My boat is called Kestrel."
    assert sent.body["metadata"] == {"k": "v"} and sent.body["reasoning"] == {}
    assert "memory" not in sent.body and told.id.startswith("resp_upstream_")
    flush(live)
    raw = client(live).responses.with_raw_response.create(
        model="gpt", input="What is my boat called?", instructions="Be brief.")
    instructions = native_upstream.history[-1].body["instructions"]
    assert "Kestrel" in instructions and instructions.endswith("Be brief.")
    assert raw.headers["x-memcube-memories"]
    assert client(live).responses.retrieve(told.id).output_text == told.output_text
    with pytest.raises(openai.NotFoundError):
        client(live, "globex").responses.retrieve(told.id)


def test_stream_is_relayed_as_sent_and_remembered(live: Live,
                                                  native_upstream: FakeUpstream) -> None:
    body = {"model": "gpt", "input": "I grow tomatoes.", "stream": True}
    with httpx.stream("POST", f"{live.base_url}/responses", json=body, timeout=30,
                      headers={"authorization": f"Bearer {KEYS['acme']}",
                               "x-memcube-user": "alice"}) as r:
        assert r.status_code == 200
        got = r.read()
    sent = native_upstream.history[-1].body
    # As sent, but for the model: the name the client asked for, not the upstream's.
    assert got == b"".join(response_events(sent)).replace(b'"model": "fake-model"',
                                                          b'"model": "gpt"')
    assert b"fake-model" not in got
    final = json.loads(got.strip().split(b"\n\n")[-1].split(b"data: ", 1)[1])["response"]
    assert client(live).responses.retrieve(final["id"]).id == final["id"]
    flush(live)
    memories = httpx.get(f"{live.base_url}/memories?user=alice", timeout=30,
                         headers={"authorization": f"Bearer {KEYS['acme']}"}).json()["data"]
    assert [m["text"] for m in memories] == ["I grow tomatoes."]


def test_sdk_stream_helper_and_previous_response_id(live: Live,
                                                    native_upstream: FakeUpstream) -> None:
    with client(live).responses.stream(model="gpt", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Hello from the fake upstream."
    client(live).responses.create(model="gpt", input="more", previous_response_id=final.id)
    assert native_upstream.history[-1].body["previous_response_id"] == final.id
    with pytest.raises(openai.NotFoundError):
        client(live, "globex").responses.create(model="gpt", input="x",
                                                previous_response_id=final.id)


def test_upstream_failures(live: Live, native_upstream: FakeUpstream) -> None:
    native_upstream.enqueue(Status(400, "bad thing", code="invalid_value"))
    with pytest.raises(openai.BadRequestError):
        client(live).responses.create(model="gpt", input="hi")
    native_upstream.enqueue(Stream([response_events({"input": "x"})[0]], cut=True, done=False))
    with httpx.stream("POST", f"{live.base_url}/responses", timeout=30,
                      json={"model": "gpt", "input": "hi", "stream": True},
                      headers={"authorization": f"Bearer {KEYS['acme']}"}) as r:
        frames = r.read().strip().split(b"\n\n")
    assert frames[0].startswith(b"event: response.created")
    last = json.loads(frames[-1].split(b"data: ", 1)[1])
    assert last["type"] == "error" and last["message"]


def test_native_needs_the_direct_transport(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, memory=MemorySettings(enabled=False), models=[
        ModelConfig(name="c", backend="litellm", model="anthropic/claude", responses="native")])
    with pytest.raises(ValueError, match="responses native needs"):
        create_app(settings)
