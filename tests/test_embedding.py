"""The real embedders: MiniLM on llama.cpp against sentence-transformers' vectors, and
LiteLLMEmbedder against a fake OpenAI-compatible embeddings server on loopback."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from memory.embedding.convert import ensure_gguf
from memory.embedding.litellm_embedder import EmbeddingDimensionError, LiteLLMEmbedder
from memory.embedding.minilm import MAX_TOKENS, MiniLMEmbedder

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.json"
REFERENCE: list[dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))["items"]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="session")
def minilm(model_cache: Path) -> Iterator[MiniLMEmbedder]:
    embedder = MiniLMEmbedder(model_cache)  # converts once for the whole session
    yield embedder
    embedder.close()


#: How far a text's vector may move between a packed call and a call of its own. llama.cpp
#: picks other matmul kernels for each; at q8_0 the activations are also quantized per
#: call (measured, deterministically: worst cosine 0.99942 and max diff 4.9e-3, on
#: the empty text; far below what moves a ranking); at f16 only rounding differs
#: (measured: max diff ~2e-4).
PACKING_TOLERANCE = {"q8_0": (1e-2, 0.999), "f16": (1e-3, 0.99999)}


@pytest.fixture(scope="module", params=sorted(PACKING_TOLERANCE))
def any_minilm(request: pytest.FixtureRequest, minilm: MiniLMEmbedder,
               model_cache: Path) -> Iterator[tuple[MiniLMEmbedder, float, float]]:
    """The default embedder, and f16 beside it, each with its packing tolerance."""
    max_diff, min_cos = PACKING_TOLERANCE[request.param]
    if minilm.model_id.endswith(request.param):
        yield minilm, max_diff, min_cos
        return
    other = MiniLMEmbedder(model_cache, precision=request.param)
    yield other, max_diff, min_cos
    other.close()


# --- MiniLM on llama.cpp -------------------------------------------------------------


def test_minilm_matches_sentence_transformers_reference(minilm: MiniLMEmbedder) -> None:
    vectors = minilm.embed([item["text"] for item in REFERENCE])
    scores = {
        item["text"][:40]: cosine(vec, item["embedding"])
        for vec, item in zip(vectors, REFERENCE, strict=True)
    }
    worst = min(scores, key=scores.__getitem__)
    print(f"min cosine vs sentence-transformers: {scores[worst]:.6f} ({worst!r})")
    bad = {text: round(score, 4) for text, score in scores.items() if score < 0.99}
    assert not bad, f"cosine < 0.99 for {bad}"


def test_minilm_identity(minilm: MiniLMEmbedder) -> None:
    assert minilm.dim == 384
    assert minilm.model_id == "all-MiniLM-L6-v2:gguf-q8_0"
    # Stores built at any other precision of these weights are accepted.
    assert minilm.same_space == {"all-MiniLM-L6-v2:gguf-f16", "all-MiniLM-L6-v2:gguf-bf16",
                                 "all-MiniLM-L6-v2:gguf-f32"}


def test_minilm_vectors_unit_length_and_batch_equals_single(
        any_minilm: tuple[MiniLMEmbedder, float, float]) -> None:
    minilm, max_diff, min_cos = any_minilm
    texts = [item["text"] for item in REFERENCE]
    batched = minilm.embed(texts)
    single = [minilm.embed_one(t) for t in texts]
    assert len(batched) == len(texts)
    for b, s in zip(batched, single, strict=True):
        assert len(b) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in b)), 1.0, abs_tol=1e-5)
        assert max(abs(x - y) for x, y in zip(b, s, strict=True)) < max_diff
        assert cosine(b, s) > min_cos


def test_minilm_batch_larger_than_one_call(
        any_minilm: tuple[MiniLMEmbedder, float, float]) -> None:
    minilm, _, min_cos = any_minilm
    texts = [f"memory number {i}: the user mentioned item {i} in passing" for i in range(150)]
    vectors = minilm.embed(texts)
    assert len(vectors) == 150
    again = minilm.embed(texts[137:140])
    for a, b in zip(vectors[137:140], again, strict=True):
        assert cosine(a, b) > min_cos


def test_minilm_truncates_long_text_to_256_tokens(minilm: MiniLMEmbedder) -> None:
    text = "Memories accumulate over many conversations with the assistant. " * 100
    tokens = minilm.tokenize(text)
    assert len(tokens) == MAX_TOKENS
    assert tokens[-1] == minilm.tokenize("")[-1]  # still ends with [SEP]
    (vector,) = minilm.embed([text])
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-5)


def test_minilm_empty_list_gives_empty_list(minilm: MiniLMEmbedder) -> None:
    assert minilm.embed([]) == []


def test_minilm_concurrent_calls_are_serialised(minilm: MiniLMEmbedder) -> None:
    texts = [item["text"] for item in REFERENCE[:8]]
    expected = minilm.embed(texts)
    results: list[list[list[float]]] = []

    def worker() -> None:
        results.append(minilm.embed(texts))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for result in results:
        for a, b in zip(result, expected, strict=True):
            assert cosine(a, b) > 0.99999


def test_gguf_is_reused_on_second_construction(
    minilm: MiniLMEmbedder, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memory.embedding.convert")
    before = minilm.gguf_path.stat()
    second = MiniLMEmbedder(model_cache)
    try:
        assert second.gguf_path == minilm.gguf_path
        after = second.gguf_path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert "converting" not in caplog.text
        assert second.embed_one("hello") == pytest.approx(minilm.embed_one("hello"), abs=1e-6)
    finally:
        second.close()
    second.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        second.embed(["hello"])


def test_truncated_or_corrupt_gguf_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="memory.embedding.convert")
    path = ensure_gguf(tmp_path)
    good = path.read_bytes()

    with path.open("r+b") as f:
        f.truncate(len(good) // 2)
    caplog.clear()
    assert ensure_gguf(tmp_path) == path
    assert "truncated" in caplog.text
    assert path.read_bytes() == good

    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    caplog.clear()
    ensure_gguf(tmp_path)
    assert "corrupt" in caplog.text
    assert path.read_bytes() == good

    path.with_name(path.name + ".json").unlink()
    caplog.clear()
    ensure_gguf(tmp_path)
    assert "sidecar missing" in caplog.text
    assert path.read_bytes() == good
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


# --- LiteLLMEmbedder against a fake embeddings API ----------------------------------


class FakeEmbeddingsAPI:
    """OpenAI-shaped POST /v1/embeddings on loopback; vector i is [i+1, 2, 2, ...] (unnormalised)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.requests: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append({"path": self.path, "body": body, "auth": self.headers["Authorization"]})
                if self.path != "/v1/embeddings":
                    self.send_error(404)
                    return
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                data = [
                    {"object": "embedding", "index": i, "embedding": [float(i + 1)] + [2.0] * (api.dim - 1)}
                    for i in range(len(texts))
                ]
                reply = json.dumps({
                    "object": "list",
                    "data": data[::-1],  # out of order on purpose: clients must sort by index
                    "model": body["model"],
                    "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fake_api() -> Iterator[FakeEmbeddingsAPI]:
    api = FakeEmbeddingsAPI(dim=8)
    yield api
    api.close()


def test_litellm_embedder_returns_normalised_vectors_in_order(fake_api: FakeEmbeddingsAPI) -> None:
    embedder = LiteLLMEmbedder("openai/fake-embed", 8, api_base=fake_api.url, api_key="sk-test")
    assert embedder.model_id == "openai/fake-embed"
    vectors = embedder.embed(["first", "second", "third"])
    assert len(vectors) == 3
    for i, vec in enumerate(vectors):
        raw = [float(i + 1)] + [2.0] * 7
        norm = math.sqrt(sum(x * x for x in raw))
        assert vec == pytest.approx([x / norm for x in raw])
    (request,) = fake_api.requests
    assert request["path"] == "/v1/embeddings"
    assert request["body"]["model"] == "fake-embed"
    assert request["body"]["input"] == ["first", "second", "third"]
    assert request["auth"] == "Bearer sk-test"


def test_litellm_embedder_empty_list_makes_no_call(fake_api: FakeEmbeddingsAPI) -> None:
    embedder = LiteLLMEmbedder("openai/fake-embed", 8, api_base=fake_api.url, api_key="sk-test")
    assert embedder.embed([]) == []
    assert fake_api.requests == []


def test_litellm_embedder_dimension_mismatch_is_a_clear_error(fake_api: FakeEmbeddingsAPI) -> None:
    embedder = LiteLLMEmbedder("openai/fake-embed", 384, api_base=fake_api.url, api_key="sk-test")
    with pytest.raises(EmbeddingDimensionError, match=r"returned 8-dimensional vectors but dim=384"):
        embedder.embed(["hello"])


def test_minilm_threads_come_from_the_settings(model_cache: Path, tmp_path: Path) -> None:
    from proxy.settings import EmbedderSettings, MemorySettings, Settings
    from proxy.wiring import build_embedder

    settings = Settings(data_dir=tmp_path, memory=MemorySettings(
        embedder=EmbedderSettings(cache_dir=model_cache, n_threads=1)))
    embedder = build_embedder(settings)
    try:
        assert isinstance(embedder, MiniLMEmbedder)
        llama = embedder._require_open()
        assert (llama.n_threads, llama.n_threads_batch) == (1, 1)
        assert len(embedder.embed(["one thread"])[0]) == 384
    finally:
        embedder.close()
