"""``POST /v1/embeddings`` over real HTTP, with the real openai SDK (sync and async) and
LangChain's ``OpenAIEmbeddings`` as clients: the embedded MiniLM (real llama.cpp), and
upstream models relayed to the scripted fake upstream by both transports."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from memory import offline
from proxy.app import create_app
from proxy.embeddings import local as local_module
from proxy.settings import (
    AuthSettings,
    EmbedderSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import Delay, FakeUpstream, Malformed, Status, embedding
from proxy.testing.live import Live, refused_port, serve
from tests.conftest import KEYS, api, upstream_settings
from tests.conftest import sdk as tenant_sdk

MINILM = "all-minilm-l6-v2"
TEXTS = ["The cat sits on the mat.", "A cat is sitting on a mat.",
         "Stock markets fell sharply on Monday.", "Ünïcödé, emoji 🙂 and CJK 漢字 survive."]
ERROR_KEYS = {"message", "type", "param", "code"}


def cl100k() -> Any:
    return offline.tiktoken_encoding("cl100k_base")


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def vectors(reply: Any) -> list[list[float]]:
    return [item.embedding for item in sorted(reply.data, key=lambda d: d.index)]


def post(live: Live, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(f"{live.base_url}/embeddings", json=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None, says: str) -> dict[str, Any]:
    assert r.status_code == status, r.text[:1000]
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == ERROR_KEYS, err
    assert err["param"] == param, err
    assert says in err["message"], err
    return err


# --- the embedded MiniLM ------------------------------------------------------------------

@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Live]:
    """The local chat model, the embedded MiniLM (loaded on first use: memory is off) and
    an upstream, without auth."""
    with FakeUpstream() as up:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("embeddings"),
            models=[ModelConfig(name="local", backend="llamacpp", n_ctx=512),
                    ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                                api_base=up.url, max_retries=0)],
            memory=MemorySettings(enabled=False, embedder=EmbedderSettings(cache_dir=model_cache)),
        )
        with serve(create_app(settings)) as live:
            yield live


def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_embedded_minilm(local: Live) -> None:
    ids = [m.id for m in client(local).models.list()]
    assert ids == ["local", "up", MINILM]


def test_local_vectors_are_minilm_unit_vectors_with_its_token_counts(local: Live) -> None:
    reply = client(local).embeddings.create(model=MINILM, input=TEXTS)
    got = vectors(reply)
    assert reply.model == MINILM and reply.object == "list"
    assert [d.index for d in reply.data] == [0, 1, 2, 3]
    assert all(len(v) == 384 and abs(norm(v) - 1) < 1e-5 for v in got)
    # The model itself, in one call like the request's, gives these very vectors.
    embedder = local.context.embeddings.loaded  # type: ignore[union-attr]
    assert embedder is not None, "memory is off: the route loaded its own MiniLM"
    assert np.array_equal(np.float32(got), np.float32(embedder.embed(TEXTS)))
    counts = [embedder.count_tokens(t) for t in TEXTS]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(counts)
    # Meaning, not noise: the paraphrase is nearer than the unrelated sentence.
    assert cosine(got[0], got[1]) > 0.8 > 0.3 > cosine(got[0], got[2])


def test_same_text_same_vector_and_float_agrees_with_base64(local: Live) -> None:
    sdk = client(local)
    first = vectors(sdk.embeddings.create(model=MINILM, input=TEXTS[0]))
    again = vectors(sdk.embeddings.create(model=MINILM, input=TEXTS[0]))
    floats = vectors(sdk.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="float"))
    assert first == again == floats
    # The SDK asked for base64 (its default) and got it; float when asked for float.
    raw = post(local, {"model": MINILM, "input": TEXTS[0], "encoding_format": "base64"}).json()
    packed = raw["data"][0]["embedding"]
    assert isinstance(packed, str)
    assert np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist() == first[0]
    plain = post(local, {"model": MINILM, "input": TEXTS[0]}).json()["data"][0]["embedding"]
    assert plain == first[0]


def test_token_ids_decode_to_the_vectors_of_their_text(local: Live) -> None:
    sdk = client(local)
    enc = cl100k()
    texts = vectors(sdk.embeddings.create(model=MINILM, input=TEXTS))
    ids = vectors(sdk.embeddings.create(model=MINILM, input=[enc.encode(t) for t in TEXTS]))
    assert ids == texts
    one_text = sdk.embeddings.create(model=MINILM, input=TEXTS[3])
    one_ids = sdk.embeddings.create(model=MINILM, input=enc.encode(TEXTS[3]))
    assert vectors(one_ids) == vectors(one_text) and len(one_ids.data) == 1
    # usage counts MiniLM's tokens of the text, not the client's cl100k ids.
    assert one_ids.usage.prompt_tokens == one_text.usage.prompt_tokens
    assert one_text.usage.prompt_tokens != len(enc.encode(TEXTS[3]))


def test_async_sdk_concurrent_requests(local: Live) -> None:
    expected = [vectors(client(local).embeddings.create(model=MINILM, input=t))[0] for t in TEXTS]

    async def run() -> list[list[float]]:
        async with openai.AsyncOpenAI(base_url=local.base_url, api_key="unused",
                                      max_retries=0) as aclient:
            replies = await asyncio.gather(*(aclient.embeddings.create(model=MINILM, input=t)
                                             for t in TEXTS))
            lists = await aclient.embeddings.create(model=MINILM, input=[cl100k().encode(TEXTS[2])])
        return [vectors(r)[0] for r in replies] + vectors(lists)

    got = asyncio.run(run())
    assert got[:4] == expected
    assert got[4] == expected[2]


def test_a_big_batch_does_not_block_the_event_loop(local: Live) -> None:
    texts = [f"sentence number {i} about the weather in town {i % 17}" for i in range(512)]
    took: list[float] = []

    def big() -> None:
        start = time.perf_counter()
        reply = client(local).embeddings.create(model=MINILM, input=texts)
        took.append(time.perf_counter() - start)
        assert len(reply.data) == 512

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.3)
    pings = []
    while worker.is_alive():
        start = time.perf_counter()
        assert httpx.get(f"{local.url}/healthz", timeout=30).status_code == 200
        pings.append(time.perf_counter() - start)
        time.sleep(0.05)
    worker.join()
    assert took and took[0] > 0.5, "the batch must take long enough to tell"
    assert pings and max(pings) < took[0] / 3, (max(pings), took)


def test_dimensions_other_than_384_is_a_400(local: Live) -> None:
    assert len(vectors(client(local).embeddings.create(model=MINILM, input="x",
                                                       dimensions=384))[0]) == 384
    with pytest.raises(openai.BadRequestError) as caught:
        client(local).embeddings.create(model=MINILM, input="x", dimensions=256)
    assert caught.value.status_code == 400
    err = assert_error(post(local, {"model": MINILM, "input": "x", "dimensions": 128}), 400,
                       "dimensions", "384-dimensional")
    assert "128" in err["message"]


def test_inputs_longer_than_the_window_are_refused_not_cut(local: Live) -> None:
    embedder = local.context.embeddings.loaded  # type: ignore[union-attr]
    fits, over = "word " * 254, "word " * 255
    assert embedder is not None
    assert (embedder.count_tokens(fits), embedder.count_tokens(over)) == (256, 257)
    assert client(local).embeddings.create(model=MINILM, input=fits).usage.prompt_tokens == 256
    assert_error(post(local, {"model": MINILM, "input": ["short", over]}), 400, "input.[1]",
                 "257 tokens long")
    assert_error(post(local, {"model": MINILM, "input": over}), 400, "input", "at most 256")
    ids = cl100k().encode(over)
    assert_error(post(local, {"model": MINILM, "input": ids}), 400, "input", "257 tokens")


def test_unknown_token_ids_name_the_position(local: Live) -> None:
    assert_error(post(local, {"model": MINILM, "input": [[100, 200], [300, 100256, 5]]}), 400,
                 "input.[1].[1]", "100256 is no token of cl100k_base")


def test_too_many_inputs_is_a_400_for_every_model(local: Live) -> None:
    for model in (MINILM, "up"):
        assert_error(post(local, {"model": model, "input": ["a"] * 2049}), 400, "input",
                     "2049 inputs; at most 2048")


def test_a_chat_only_model_and_an_unknown_model(local: Live) -> None:
    err = assert_error(post(local, {"model": "local", "input": "x"}), 400, "model",
                       "'local' serves no embeddings")
    assert err["code"] == "model_not_supported" and MINILM in err["message"]
    err = assert_error(post(local, {"model": "text-embedding-3-small", "input": "x"}), 404,
                       "model", "does not exist")
    assert err["code"] == "model_not_found"


def test_metrics_count_embeddings_by_model(local: Live) -> None:
    client(local).embeddings.create(model=MINILM, input="counted")
    post(local, {"model": MINILM, "input": ""})
    text = httpx.get(f"{local.url}/metrics", timeout=10).text
    ok = [line for line in text.splitlines() if line.startswith(
        f'memcube_requests_total{{model="{MINILM}",route="/v1/embeddings",status="200"}}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert (f'memcube_request_errors_total{{model="{MINILM}",route="/v1/embeddings",'
            'status="400",type="invalid_request_error"}') in text


def test_langchain_openai_embeddings_matches_the_sdk(local: Live,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_openai import OpenAIEmbeddings

    seen: list[Any] = []
    texts_of = local_module._texts

    def spy(req: Any) -> list[str]:
        seen.append(req.input)
        return texts_of(req)

    monkeypatch.setattr(local_module, "_texts", spy)
    lc = OpenAIEmbeddings(model=MINILM, base_url=local.base_url, api_key="unused")  # type: ignore[arg-type]
    docs = lc.embed_documents(TEXTS)
    query = lc.embed_query(TEXTS[0])
    # LangChain sent cl100k token ids (its default), one list per text.
    assert seen[0] == [cl100k().encode(t) for t in TEXTS]
    assert seen[1] == [cl100k().encode(TEXTS[0])]
    sdk = client(local)
    want_docs = vectors(sdk.embeddings.create(model=MINILM, input=TEXTS))
    want_query = vectors(sdk.embeddings.create(model=MINILM, input=TEXTS[0]))[0]
    # LangChain normalises again (float64): the same vectors up to rounding.
    assert np.allclose(docs, want_docs, atol=1e-6)
    assert np.allclose(query, want_query, atol=1e-6)


def test_memory_shares_its_minilm_and_remembers_no_embeddings(memory_live: Live) -> None:
    """Memory on, embedding with the local MiniLM: that one instance serves the route,
    auth applies as on chat, and nothing is remembered."""
    live = memory_live
    r = httpx.post(f"{live.base_url}/embeddings", json={"model": MINILM, "input": "x"})
    assert_error(r, 401, None, "Missing API key")
    sdk = tenant_sdk(live)
    reply = sdk.embeddings.create(model=MINILM, input=["My name is Ada and I live in Lisbon."])
    assert live.context.embeddings is not None and live.context.embeddings.loaded is None
    memory = live.context.memory
    assert memory is not None
    assert vectors(reply)[0] == np.float32(
        memory.embedder.embed(["My name is Ada and I live in Lisbon."])[0]).tolist()
    relayed = sdk.embeddings.create(model="up", input="I live in Lisbon too.")
    assert len(vectors(relayed)[0]) == 384
    assert api(live, "POST", "/memories/flush").status_code == 200
    assert api(live, "GET", "/memories").json()["data"] == []


def test_rate_limits_apply(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = upstream_settings(tmp_path, upstream)
    settings = settings.model_copy(update={
        "auth": AuthSettings(enabled=True),
        "tenants": [TenantConfig(id="acme", api_keys=[KEYS["acme"]], rate_limit_rpm=2)],
        "embeddings": settings.embeddings.model_copy(update={"local_model": None})})
    with serve(create_app(settings)) as live:
        sdk = openai.OpenAI(base_url=live.base_url, api_key=KEYS["acme"], max_retries=0)
        assert [m.id for m in sdk.models.list()] == ["up"]  # local_model null: not served
        sdk.embeddings.create(model="up", input="one")
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.embeddings.create(model="up", input="two")
        assert caught.value.response.headers["retry-after"]
        r = post(live, {"model": MINILM, "input": "x"}, authorization=f"Bearer {KEYS['acme']}")
    assert r.status_code == 429  # the limit is checked before the model is looked up


# --- relayed upstream models ----------------------------------------------------------------

@pytest.fixture(params=["direct", "litellm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def relay(tmp_path: Path, upstream: FakeUpstream, transport: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-upstream-secret")
    settings = upstream_settings(tmp_path, upstream, transport, timeout=1.0)
    with serve(create_app(settings)) as live:
        yield live


def test_relay_sync_and_async(relay: Live, upstream: FakeUpstream, transport: str) -> None:
    texts = ["first text here", "second one"]
    reply = client(relay).embeddings.create(model="up", input=texts)
    assert np.allclose(vectors(reply), [embedding(t) for t in texts], atol=1e-6)
    assert reply.usage.prompt_tokens == 5  # the upstream's count, relayed
    sent = upstream.history[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body["model"] == "fake-model" and sent.body["input"] == texts
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    if transport == "direct":  # relayed as sent; litellm asks for floats and encodes them
        assert sent.body["encoding_format"] == "base64"

    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=relay.base_url, api_key="k",
                                      max_retries=0) as aclient:
            return await aclient.embeddings.create(model="up", input="async text",
                                                   encoding_format="float")

    floats = asyncio.run(run())
    assert np.allclose(vectors(floats)[0], embedding("async text"), atol=1e-6)
    assert upstream.history[-1].body["input"] == "async text"


def test_relay_passes_token_ids_and_fields_as_given(relay: Live, upstream: FakeUpstream,
                                                    transport: str) -> None:
    ids = [[1, 2, 3], [40, 50]]
    reply = client(relay).embeddings.create(model="up", input=ids, dimensions=8,
                                            user="u-1", extra_body={"vendor_flag": True})
    assert len(reply.data) == 2
    sent = upstream.history[-1].body
    assert sent["input"] == ids
    assert (sent["dimensions"], sent["user"], sent["vendor_flag"]) == (8, "u-1", True)
    single = client(relay).embeddings.create(model="up", input=[7, 8, 9])
    assert len(single.data) == 1 and upstream.history[-1].body["input"] == [7, 8, 9]


@pytest.mark.parametrize("status", [400, 401, 404, 429])
def test_upstream_4xx_keeps_status(relay: Live, upstream: FakeUpstream, status: int) -> None:
    # A fallback, not one step: litellm's client retries 429s (see LiteLLMBackend.embeddings).
    upstream.fallback = Status(status, "upstream says no", code="bad_thing",
                               headers={"retry-after-ms": "1"})
    r = post(relay, {"model": "up", "input": "x"})
    assert_error(r, status, None, "upstream says no")


@pytest.mark.parametrize("step", [Status(500), Status(503, headers={"retry-after-ms": "1"}),
                                  Malformed()], ids=["500", "503", "malformed"])
def test_upstream_failures_are_502(relay: Live, upstream: FakeUpstream, step: Any) -> None:
    upstream.fallback = step
    err = assert_error(post(relay, {"model": "up", "input": "x"}), 502, None, "")
    assert err["type"] == "api_error"


def test_upstream_timeout_is_504(relay: Live, upstream: FakeUpstream) -> None:
    upstream.fallback = Delay(1.5)  # the model's timeout is 1 s
    err = assert_error(post(relay, {"model": "up", "input": "x"}), 504, None, "timed out")
    assert err["code"] == "upstream_timeout"


def test_upstream_down_is_502(tmp_path: Path, upstream: FakeUpstream, transport: str) -> None:
    settings = upstream_settings(tmp_path, upstream, transport,
                                 api_base=f"http://127.0.0.1:{refused_port()}/v1")
    with serve(create_app(settings)) as live:
        err = assert_error(post(live, {"model": "up", "input": "x"}), 502, None, "unreachable")
    assert err["code"] == "upstream_unavailable"


def test_bad_input_never_reaches_the_upstream(relay: Live, upstream: FakeUpstream) -> None:
    for body, param in [({"model": "up", "input": ""}, "input"),
                        ({"model": "up", "input": [1, "a"]}, "input.[1]"),
                        ({"model": "up", "input": "x", "encoding_format": "int8"},
                         "encoding_format")]:
        assert_error(post(relay, body), 400, param, "Invalid value")
    assert upstream.history == []
