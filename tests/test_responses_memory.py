"""Memory through ``/v1/responses`` exactly as through chat: recall and injection, the
``X-Memcube-*`` headers, write-back, the tenant's adapter, and a fact told on one
endpoint recalled on the other. Real MiniLM, Qdrant Edge on disk, the fake upstream."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.settings import (
    AdapterConfig,
    AuthSettings,
    EmbedderSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve
from tests.conftest import api, sdk


@pytest.fixture
def live(memory_live: Live) -> Live:
    return memory_live


def flush(live: Live) -> None:
    assert api(live, "POST", "/memories/flush").json()["flushed"] is True


def system_content(upstream: FakeUpstream) -> str:
    first = upstream.history[-1].body["messages"][0]
    return str(first["content"]) if first["role"] == "system" else ""


def test_fact_told_through_responses_is_recalled_in_chat(live: Live,
                                                          upstream: FakeUpstream) -> None:
    told = sdk(live).responses.with_raw_response.create(
        model="up", input="My sister Ofelia lives in Porto.")
    assert told.headers["x-memcube-request-id"]
    flush(live)
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Where does my sister live?"}])
    assert "Ofelia lives in Porto" in system_content(upstream)
    item = api(live, "GET", f"/memories/{raw.headers['x-memcube-memories']}").json()
    assert item["sources"][0]["request_id"] == told.headers["x-memcube-request-id"]


def test_fact_told_in_chat_is_injected_into_responses(live: Live,
                                                       upstream: FakeUpstream) -> None:
    sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "I keep bees on my roof in Lyon."}])
    flush(live)
    raw = sdk(live).responses.with_raw_response.create(
        model="up", input="Where are my bees?", instructions="Answer briefly.")
    sent = upstream.history[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "Answer briefly."}
    assert "bees on my roof in Lyon" in sent[1]["content"] and sent[1]["role"] == "system"
    assert sent[-1] == {"role": "user", "content": "Where are my bees?"}
    assert len(raw.headers["x-memcube-memories"].split(",")) == 1
    assert raw.parse().output_text == "Hello from the fake upstream."


def test_streamed_response_is_remembered_and_memory_options_apply(
        live: Live, upstream: FakeUpstream) -> None:
    with sdk(live).responses.stream(model="up", input="My cat is called Miso.") as stream:
        for _ in stream:
            pass
    sdk(live).responses.create(model="up", input="My dog is called Pan.",
                               extra_body={"memory": {"write": False}})
    flush(live)
    texts = [m["text"] for m in api(live, "GET", "/memories?user=alice").json()["data"]]
    assert any("Miso" in t for t in texts)
    assert not any("Pan" in t for t in texts)
    sdk(live).responses.create(model="up", input="What is my cat called?",
                               extra_body={"memory": {"enabled": False, "write": False}})
    assert "Miso" not in system_content(upstream)


def test_a_continuation_writes_back_only_its_new_turn(live: Live) -> None:
    first = sdk(live).responses.create(model="up", input="I was born in Quito.")
    sdk(live).responses.create(model="up", input="I studied in Lima.",
                               previous_response_id=first.id)
    flush(live)
    texts = sorted(m["text"] for m in api(live, "GET", "/memories?user=alice").json()["data"])
    assert texts == ["I studied in Lima.", "I was born in Quito."]


def test_purge_erases_the_users_stored_responses(live: Live) -> None:
    mine = sdk(live).responses.create(model="up", input="Private note one.")
    theirs = sdk(live, user="bob").responses.create(model="up", input="Bob's note.")
    r = api(live, "POST", "/memories/purge", json={"user": "alice"}).json()
    assert r["responses_deleted"] == 1 and r["deleted"] >= 1
    with pytest.raises(openai.NotFoundError):
        sdk(live).responses.retrieve(mine.id)
    assert sdk(live, user="bob").responses.retrieve(theirs.id).id == theirs.id


def test_tenant_adapter_applies_to_responses(tmp_path: Path, upstream: FakeUpstream,
                                             model_cache: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=upstream.url, max_retries=0)],
        auth=AuthSettings(enabled=True),
        adapters=[AdapterConfig(name="acme-style", upstream_model="openai/fake-model-lora")],
        tenants=[TenantConfig(id="acme", api_keys=["sk-acme"], adapter="acme-style")],
        memory=MemorySettings(embedder=EmbedderSettings(cache_dir=model_cache)),
    )
    with serve(create_app(settings)) as server:
        raw = httpx.post(f"{server.base_url}/responses", timeout=60,
                         headers={"authorization": "Bearer sk-acme"},
                         json={"model": "up", "input": "hi"})
        assert raw.status_code == 200, raw.text
        assert raw.headers["x-memcube-adapter"] == "acme-style"
        assert raw.headers["x-memcube-activation"] == "none"
        assert upstream.history[-1].body["model"] == "fake-model-lora"
