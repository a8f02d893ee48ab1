"""The passthrough: /v1 paths the proxy does not serve, relayed to a configured upstream.

The upstream here is a small recording server (FastAPI under real uvicorn on loopback)
that answers as OpenAI's files, audio and moderations endpoints do, and can prove that
bodies stream through the proxy rather than being held whole: its upload handler waits
for the first chunk before the client sends the second, and its event stream waits for
the client to receive the first event before it sends the second.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from proxy.app import create_app
from proxy.settings import (
    AuthSettings,
    MemorySettings,
    ModelConfig,
    PassthroughSettings,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, refused_port, serve

TENANT_KEY = "sk-passthrough-tenant"
UPSTREAM_KEY = "sk-the-upstreams-own-key"
FILE_BYTES = bytes(range(256)) * 64 + b"\r\n--not-a-boundary--\r\n"
AUDIO = [bytes([n]) * 4096 for n in range(5)]
LIMIT = 1024 * 1024  # max_body_bytes: uploads are bounded like every body
MODERATION = {"id": "modr-1", "model": "omni-moderation-latest", "results": [
    {"flagged": False, "categories": {}, "category_scores": {}}]}


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)
    #: The upload's first chunk reached the upstream.
    first_chunk_in: threading.Event = field(default_factory=threading.Event)
    #: The client read the event stream's first event.
    client_has_first: threading.Event = field(default_factory=threading.Event)
    waited: list[bool] = field(default_factory=list)  # what the event stream found
    #: The endless stream was stopped (its client, the proxy, hung up).
    stopped: threading.Event = field(default_factory=threading.Event)


def upstream_app(rec: Recorder) -> FastAPI:
    app = FastAPI()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything(request: Request, path: str) -> Response:
        if path == "uploads/stream":  # read as it comes, noting the first chunk
            parts = []
            async for chunk in request.stream():
                if chunk:
                    parts.append(chunk)
                    rec.first_chunk_in.set()
            body = b"".join(parts)
        else:
            body = await request.body()
        rec.seen.append(Seen(request.method, "/v1/" + path, request.url.query,
                             dict(request.headers), body))
        if path == "moderations":
            return JSONResponse(MODERATION)
        if path == "files" and request.method == "POST":
            return JSONResponse({"id": "file-abc", "object": "file", "bytes": len(body),
                                 "created_at": 1700000000, "filename": "notes.jsonl",
                                 "purpose": "batch", "status": "uploaded"})
        if path == "files" and request.method == "GET":
            return JSONResponse({"object": "list", "data": [], "has_more": False})
        if path == "files/file-abc/content":
            return Response(FILE_BYTES, media_type="application/octet-stream")
        if path == "audio/speech":
            async def audio() -> AsyncIterator[bytes]:
                for part in AUDIO:
                    yield part
            return StreamingResponse(audio(), media_type="audio/mpeg")
        if path == "events":
            async def events() -> AsyncIterator[bytes]:
                yield b"data: one\n\n"
                rec.waited.append(await asyncio.to_thread(rec.client_has_first.wait, 10))
                yield b"data: two\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        if path == "endless":
            async def endless() -> AsyncIterator[bytes]:
                try:
                    while True:
                        yield b"data: more\n\n"
                        await asyncio.sleep(0.02)
                finally:
                    rec.stopped.set()
            return StreamingResponse(endless(), media_type="text/event-stream")
        if path == "gzipped":
            return Response(gzip.compress(b"squeezed " * 100), media_type="text/plain",
                            headers={"content-encoding": "gzip"})
        if path == "teapot":
            return JSONResponse({"error": {"message": "short and stout", "type": "teapot"}},
                                status_code=418, headers={"x-upstream-note": "steeped"})
        return JSONResponse({"ok": True, "path": path})

    return app


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, Live]]:
    rec = Recorder()
    with serve(upstream_app(rec)) as live:
        yield rec, live


def settings(tmp_path: Path, model_upstream: FakeUpstream, api_base: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=model_upstream.url, max_retries=0)],
        auth=AuthSettings(enabled=True),
        tenants=[TenantConfig(id="acme", api_keys=[TENANT_KEY])],
        memory=MemorySettings(enabled=False),
        max_body_bytes=LIMIT,
        passthrough=(PassthroughSettings(api_base=api_base, api_key_env="PASSTHROUGH_KEY",
                                         timeout=10) if api_base else None),
    )


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream, recorder: tuple[Recorder, Live],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    monkeypatch.setenv("PASSTHROUGH_KEY", UPSTREAM_KEY)
    with serve(create_app(settings(tmp_path, upstream, recorder[1].base_url))) as live:
        yield live


def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=TENANT_KEY, max_retries=0,
                         default_headers={"x-memcube-user": "alice"})


def last(recorder: tuple[Recorder, Live]) -> Seen:
    return recorder[0].seen[-1]


def test_moderations_relayed_with_the_upstreams_key(proxy: Live,
                                                    recorder: tuple[Recorder, Live]) -> None:
    reply = client(proxy).moderations.create(input="I would like a hug",
                                             model="omni-moderation-latest")
    assert reply.id == "modr-1" and reply.results[0].flagged is False
    seen = last(recorder)
    assert (seen.method, seen.path) == ("POST", "/v1/moderations")
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert TENANT_KEY not in str(seen.headers)
    assert "x-memcube-user" not in seen.headers  # the proxy's own headers stay here
    assert json.loads(seen.body) == {"input": "I would like a hug",
                                     "model": "omni-moderation-latest"}


def test_file_upload_reaches_the_upstream_byte_for_byte(proxy: Live,
                                                        recorder: tuple[Recorder, Live]) -> None:
    made = client(proxy).files.create(file=("notes.jsonl", FILE_BYTES, "application/jsonl"),
                                      purpose="batch")
    assert made.id == "file-abc" and made.bytes > len(FILE_BYTES)
    seen = last(recorder)
    assert (seen.method, seen.path) == ("POST", "/v1/files")
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert FILE_BYTES in seen.body and b'filename="notes.jsonl"' in seen.body
    assert int(seen.headers["content-length"]) == len(seen.body) == made.bytes
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_file_content_comes_back_binary(proxy: Live, recorder: tuple[Recorder, Live]) -> None:
    content = client(proxy).files.content("file-abc")
    assert content.content == FILE_BYTES
    assert content.response.headers["content-type"] == "application/octet-stream"
    assert last(recorder).method == "GET"


def test_speech_streams_back_as_audio(proxy: Live, recorder: tuple[Recorder, Live]) -> None:
    with client(proxy).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Hello there") as speech:
        assert speech.headers["content-type"] == "audio/mpeg"
        audio = b"".join(speech.iter_bytes())
    assert audio == b"".join(AUDIO)
    assert last(recorder).path == "/v1/audio/speech"


async def test_async_client(proxy: Live, recorder: tuple[Recorder, Live]) -> None:
    c = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TENANT_KEY, max_retries=0)
    reply = await c.moderations.create(input="hello")
    assert reply.id == "modr-1"
    content = await c.files.content("file-abc")
    assert content.content == FILE_BYTES
    await c.close()


def test_get_keeps_the_query_string_as_sent(proxy: Live,
                                            recorder: tuple[Recorder, Live]) -> None:
    page = client(proxy).files.list(purpose="batch", limit=2)
    assert page.data == []
    assert sorted(last(recorder).query.split("&")) == ["limit=2", "purpose=batch"]
    r = httpx.get(f"{proxy.base_url}/vector_stores/vs%2F1/files?after=a%20b&x=%C3%A9",
                  headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert r.status_code == 200 and r.json()["path"] == "vector_stores/vs/1/files"
    assert last(recorder).query == "after=a%20b&x=%C3%A9"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_methods_are_relayed(proxy: Live, recorder: tuple[Recorder, Live],
                                   method: str) -> None:
    r = httpx.request(method, f"{proxy.base_url}/batches/b1", json={"a": 1},
                      headers={"authorization": f"Bearer {TENANT_KEY}", "x-custom": "kept"})
    assert r.status_code == 200
    seen = last(recorder)
    assert (seen.method, seen.path, seen.body) == (method, "/v1/batches/b1", b'{"a":1}')
    assert seen.headers["x-custom"] == "kept"


def test_status_headers_and_encoding_are_relayed(proxy: Live) -> None:
    auth = {"authorization": f"Bearer {TENANT_KEY}"}
    r = httpx.get(f"{proxy.base_url}/teapot", headers=auth)
    assert r.status_code == 418
    assert r.json()["error"]["message"] == "short and stout"
    assert r.headers["x-upstream-note"] == "steeped"
    assert r.headers["content-type"] == "application/json"
    assert len(r.headers["x-memcube-request-id"]) == 32
    zipped = httpx.get(f"{proxy.base_url}/gzipped", headers={**auth, "accept-encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"  # as the upstream sent it
    assert zipped.text == "squeezed " * 100


def test_upload_streams_through_without_being_held(proxy: Live,
                                                   recorder: tuple[Recorder, Live]) -> None:
    rec = recorder[0]
    arrived: list[bool] = []

    def body() -> Iterator[bytes]:
        yield b"first chunk;"
        # Held whole, the body would not reach the upstream before its end: this waits.
        arrived.append(rec.first_chunk_in.wait(10))
        yield b"second chunk"

    r = httpx.post(f"{proxy.base_url}/uploads/stream", content=body(), timeout=30,
                   headers={"authorization": f"Bearer {TENANT_KEY}",
                            "content-type": "application/octet-stream"})
    assert r.status_code == 200
    assert arrived == [True]
    assert last(recorder).body == b"first chunk;second chunk"


def test_event_stream_streams_back_without_being_held(proxy: Live,
                                                      recorder: tuple[Recorder, Live]) -> None:
    rec = recorder[0]
    with httpx.stream("GET", f"{proxy.base_url}/events", timeout=30,
                      headers={"authorization": f"Bearer {TENANT_KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "data: one"
        rec.client_has_first.set()  # the second event is sent only after this
        rest = [line for line in lines if line]
    assert rest == ["data: two"]
    assert rec.waited == [True]


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_over_the_body_limit_is_413(proxy: Live, recorder: tuple[Recorder, Live],
                                           chunked: bool) -> None:
    big = b"x" * (2 * LIMIT)

    def body() -> Iterator[bytes]:
        for at in range(0, len(big), 65536):
            yield big[at:at + 65536]

    r = httpx.post(f"{proxy.base_url}/uploads/stream", content=body() if chunked else big,
                   timeout=30, headers={"authorization": f"Bearer {TENANT_KEY}",
                                        "content-type": "application/octet-stream"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert all(len(s.body) < len(big) for s in recorder[0].seen)


def test_a_client_that_leaves_stops_the_upstream_stream(proxy: Live,
                                                         recorder: tuple[Recorder, Live]) -> None:
    with httpx.stream("GET", f"{proxy.base_url}/endless", timeout=30,
                      headers={"authorization": f"Bearer {TENANT_KEY}"}) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(3)] == ["data: more", "", "data: more"]
    assert recorder[0].stopped.wait(10)


def test_key_is_checked_before_anything_is_relayed(proxy: Live,
                                                   recorder: tuple[Recorder, Live]) -> None:
    for headers in ({}, {"authorization": "Bearer sk-wrong"}):
        r = httpx.post(f"{proxy.base_url}/moderations", json={"input": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert recorder[0].seen == []


def test_the_proxys_own_routes_are_not_captured(proxy: Live, upstream: FakeUpstream,
                                                recorder: tuple[Recorder, Live]) -> None:
    c = client(proxy)
    reply = c.chat.completions.create(model="up", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from the fake upstream."
    assert c.completions.create(model="up", prompt="hi").choices[0].text
    assert "up" in [m.id for m in c.models.list().data]
    assert [r.path for r in upstream.history] == ["/v1/chat/completions", "/v1/completions"]
    auth = {"authorization": f"Bearer {TENANT_KEY}"}
    wrong_method = httpx.get(f"{proxy.base_url}/chat/completions", headers=auth)
    assert wrong_method.status_code == 405  # the route's answer, not the upstream's
    for path in ("/memories/m1/unknown", "/cubes/c1/nothing", "/tenants/x/y", "/adapters/a/b"):
        r = httpx.post(f"{proxy.base_url}{path}", json={"secret": "stays here"}, headers=auth)
        assert r.status_code == 404 and "Unknown path" in r.json()["error"]["message"], path
    assert httpx.get(f"{proxy.url}/not-v1", headers=auth).status_code == 404
    assert recorder[0].seen == []
    metrics = httpx.get(f"{proxy.url}/metrics", headers=auth).text
    assert 'route="/v1/{path} (passthrough)"' not in metrics  # nothing was relayed
    httpx.get(f"{proxy.base_url}/files", headers=auth)
    metrics = httpx.get(f"{proxy.url}/metrics", headers=auth).text
    assert 'memcube_requests_total{model="",route="/v1/{path} (passthrough)",status="200"}' \
        in metrics


def test_upstream_down_is_502(tmp_path: Path, upstream: FakeUpstream,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSTHROUGH_KEY", UPSTREAM_KEY)
    down = f"http://127.0.0.1:{refused_port()}/v1"
    with serve(create_app(settings(tmp_path, upstream, down))) as live:
        with pytest.raises(openai.InternalServerError) as failed:
            client(live).moderations.create(input="hello")
        assert failed.value.status_code == 502
        err: Any = failed.value.body
        assert err["type"] == "api_error" and err["code"] == "upstream_unavailable"
        assert "passthrough upstream unreachable" in err["message"]


def test_without_passthrough_unknown_paths_say_how_to_configure_one(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    with serve(create_app(settings(tmp_path, upstream, None))) as live:
        with pytest.raises(openai.NotFoundError) as missing:
            client(live).moderations.create(input="hello")
        err: Any = missing.value.body
        assert err["type"] == "not_found_error"
        assert "Unknown path: /v1/moderations" in err["message"]
        assert "passthrough.api_base" in err["message"]
        r = httpx.get(f"{live.base_url}/files?limit=1",
                      headers={"authorization": f"Bearer {TENANT_KEY}"})
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param",
                                                                  "code"}
        assert httpx.get(f"{live.base_url}/files").status_code == 401  # the key first
        reply = client(live).chat.completions.create(
            model="up", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
