"""A remote embedder that cannot serve is an outage of write-back, not a bad exchange.

Through real HTTP: the proxy under uvicorn with real Qdrant Edge on disk and the real
outbox, embedding through :class:`LiteLLMEmbedder` against a second scripted fake
upstream that plays the embeddings API (``/embeddings``). What is pinned:

- while the embeddings API fails (503s), a flush answers 503 ``memory_unavailable``
  and the exchange waits: however often write-back is tried, nothing is counted
  against it and nothing is dead-lettered;
- once the API answers again, the flush succeeds and the memory is stored once;
- ``LiteLLMEmbedder`` says ``MemoryUnavailable`` for what may pass (connection errors,
  timeouts, 408, 429, 5xx) and lets configuration errors through as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memory.embedding.base import HashEmbedder
from memory.embedding.litellm_embedder import EmbeddingDimensionError, LiteLLMEmbedder
from memory.errors import MemoryUnavailable
from proxy.app import create_app
from proxy.settings import EmbedderSettings, MemorySettings, ModelConfig, Settings
from proxy.testing.fake_upstream import Delay, FakeUpstream, Status
from proxy.testing.live import Live, refused_port, serve

DIM = 384
#: The worker's default: an exchange failing this often would be dead-lettered.
MAX_ATTEMPTS = 5
SECRET = "my locker code word is heron"
# retry-after-ms: OpenAI's client (under litellm) retries a 503 twice; told to, it does
# so at once instead of waiting a second or two each time.
DOWN = Status(503, message="embeddings overloaded", headers={"retry-after-ms": "1"})


@pytest.fixture
def embeddings_api() -> Iterator[FakeUpstream]:
    with FakeUpstream(embedding_dim=DIM) as api:
        yield api


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream, embeddings_api: FakeUpstream,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    monkeypatch.setenv("FAKE_EMBEDDINGS_KEY", "sk-embeddings")
    settings = Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=upstream.url, max_retries=0)],
        memory=MemorySettings(embedder=EmbedderSettings.model_validate({
            "backend": "litellm", "model": "openai/text-embedding-3-small",
            "api_base": embeddings_api.url, "api_key_env": "FAKE_EMBEDDINGS_KEY", "dim": DIM})),
    )
    with serve(create_app(settings)) as server:
        yield server


def post(live: Live, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", json=body, timeout=60,
                      headers={"x-memcube-user": "alice"})


def texts(live: Live) -> list[str]:
    r = httpx.get(f"{live.base_url}/memories", params={"user": "alice", "limit": 1000}, timeout=60)
    assert r.status_code == 200, r.text
    return sorted(item["text"] for item in r.json()["data"])


def metric(live: Live, name: str) -> float:
    text = httpx.get(f"{live.url}/metrics", timeout=60).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported once in:\n{text}"
    return values[0]


def embedding_calls(api: FakeUpstream) -> int:
    return sum(1 for r in api.history if r.path.rstrip("/").endswith("/embeddings"))


def assert_memory_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("api_error", "memory_unavailable")


def test_embeddings_api_outage_pauses_write_back_and_dead_letters_nothing(
        live: Live, embeddings_api: FakeUpstream) -> None:
    embeddings_api.fallback = DOWN
    chat = post(live, "/chat/completions", {
        "model": "up", "messages": [{"role": "user", "content": f"Note: {SECRET}."}]})
    assert chat.status_code == 200  # answered without memory

    calls = embedding_calls(embeddings_api)
    for _ in range(MAX_ATTEMPTS + 2):
        assert_memory_unavailable(post(live, "/memories/flush"))
    # Every flush waits for a probe of its own that failed; at most one of them can have
    # asked the API before the first flush began.
    assert embedding_calls(embeddings_api) - calls >= MAX_ATTEMPTS + 1
    assert metric(live, "memcube_outbox_dead") == 0
    assert metric(live, "memcube_outbox_pending") == 1

    embeddings_api.fallback = None  # the API is back
    r = post(live, "/memories/flush")
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "memory.flush", "flushed": True}
    assert texts(live) == [f"Note: {SECRET}."]
    assert metric(live, "memcube_outbox_dead") == 0
    assert metric(live, "memcube_outbox_pending") == 0
    assert post(live, "/memories/flush").status_code == 200
    assert texts(live) == [f"Note: {SECRET}."]  # stored exactly once


# -- LiteLLMEmbedder: what counts as "cannot serve now" ---------------------------------


def embedder_for(api_base: str, dim: int = DIM, timeout: float = 60.0) -> LiteLLMEmbedder:
    return LiteLLMEmbedder("openai/text-embedding-3-small", dim, api_base=api_base,
                           api_key="sk-test", timeout=timeout)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_embedder_says_unavailable_for_statuses_that_may_pass(
        embeddings_api: FakeUpstream, status: int) -> None:
    embeddings_api.fallback = Status(status, message=f"leaked {SECRET}",
                                     headers={"retry-after-ms": "1"})
    with pytest.raises(MemoryUnavailable) as caught:
        embedder_for(embeddings_api.url).embed([SECRET])
    message = caught.value.message
    assert type(caught.value.__cause__).__name__ in message  # names the failure's type ...
    assert "heron" not in message and "heron" not in str(caught.value)  # ... never the texts


def test_embedder_says_unavailable_when_nothing_listens() -> None:
    with pytest.raises(MemoryUnavailable, match="embeddings API is unavailable"):
        embedder_for(f"http://127.0.0.1:{refused_port()}/v1").embed(["hello"])


def test_embedder_says_unavailable_on_timeout(embeddings_api: FakeUpstream) -> None:
    embeddings_api.fallback = Delay(2.0)
    with pytest.raises(MemoryUnavailable, match="Timeout"):
        embedder_for(embeddings_api.url, timeout=0.2).embed(["hello"])


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_embedder_configuration_errors_stay_ordinary(embeddings_api: FakeUpstream,
                                                     status: int) -> None:
    embeddings_api.fallback = Status(status)
    with pytest.raises(Exception) as caught:
        embedder_for(embeddings_api.url).embed(["hello"])
    assert not isinstance(caught.value, MemoryUnavailable)
    assert getattr(caught.value, "status_code", None) == status


def test_embedder_wrong_dimension_stays_ordinary(embeddings_api: FakeUpstream) -> None:
    with pytest.raises(EmbeddingDimensionError):
        embedder_for(embeddings_api.url, dim=8).embed(["hello"])


def test_embedder_probe_raises_while_the_api_is_down_and_passes_once_back(
        embeddings_api: FakeUpstream) -> None:
    embedder = embedder_for(embeddings_api.url)
    embeddings_api.fallback = DOWN
    with pytest.raises(MemoryUnavailable):
        embedder.probe()
    embeddings_api.fallback = None
    embedder.probe()
    assert embeddings_api.history[-1].body["input"] == ["probe"]


def test_local_embedder_probe_passes() -> None:
    HashEmbedder().probe()
