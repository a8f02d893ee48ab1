"""A scripted fake OpenAI-compatible upstream, on the standard library alone.

Tests and benchmarks start it on loopback and point a model's ``api_base`` at it.
Each request takes the next scripted step (``enqueue``); with none queued it takes
``fallback`` if one is set (an upstream that stays down: ``Status(503)``), else it
answers a fixed completion, streamed when asked (a ``text_completion`` on
``/completions``, a choice per prompt), on ``/embeddings`` one vector per input text
(:class:`Embeddings`), and on ``/responses`` a Responses API reply or event stream when
made with ``responses=True`` (else a 404, as chat-only servers answer). The bodies come
from :mod:`proxy.testing.replies`. Every request is kept in ``history``.

    with FakeUpstream() as up:
        up.enqueue(Reply({"choices": ...}), Status(503), Delay(2.0), Malformed(),
                   Raw(b"data: ..."), Stream([chunk, chunk], cut=True),
                   Stream([chunk, Delay(5.0), b"data: {oops"]), Embeddings(dim=8))
        up.fallback = Status(503, headers={"retry-after-ms": "1"})  # down until reset
        ...
        up.history[0].body["model"]

Run alone for benchmarks: ``python -m proxy.testing.fake_upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from proxy.testing.replies import (  # noqa: F401 - the builders scripts use, here too
    DEFAULT_TEXT,
    chunk,
    completion,
    default_stream,
    embedding,
    embeddings_reply,
    response_events,
    response_object,
    text_completion,
    text_stream,
)


@dataclass
class Reply:
    """A JSON body with a status (any status: errors are replies too)."""

    body: dict[str, Any]
    status: int = 200


@dataclass
class Status:
    """An OpenAI-style error with this status."""

    status: int
    message: str = "scripted error"
    code: str | None = None
    #: Extra response headers. ``retry-after-ms`` makes OpenAI's client retry at once
    #: instead of backing off for a second or more.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Malformed:
    """A 200 whose body is not JSON."""

    body: bytes = b"<html>this is not json</html>"


@dataclass
class Raw:
    """Bytes sent as they are, with this status and content type (SSE edge cases)."""

    body: bytes
    status: int = 200
    content_type: str = "text/event-stream"


@dataclass
class Stream:
    """SSE chunks; ``cut`` drops the connection after them without ``[DONE]``.

    Among the chunks, ``bytes`` are sent as they are (a malformed event), and a
    :class:`Delay` pauses the stream for its seconds (a stream that stalls mid-way).
    """

    chunks: list[Any]
    cut: bool = False
    #: End with ``data: [DONE]`` (chat and completions do; the Responses API does not).
    done: bool = True


@dataclass
class Delay:
    """Wait, then take the step given (default: the default reply)."""

    seconds: float
    then: Any = None


@dataclass
class Embeddings:
    """An embeddings reply: one unit vector of ``dim`` floats per input text, in order.

    Vectors hash the text's words, so the same text always gets the same vector and
    texts sharing words get nearby ones. Honours ``encoding_format: base64``, which
    OpenAI's client asks for by default.
    """

    dim: int = 384


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any


@dataclass
class _Script:
    steps: deque[Any] = field(default_factory=deque)
    history: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    record: bool = True
    fallback: Any = None
    embedding_dim: int = 384
    #: Serves the Responses API (``/responses``); else it is a 404, as on chat-only servers.
    responses: bool = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
        # algorithm and delayed ACKs add ~40 ms to every reply.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        script = self.server.script
        with script.lock:
            if script.record:
                headers = {k.lower(): v for k, v in self.headers.items()}
                script.history.append(Recorded(self.path, headers, body))
            step = script.steps.popleft() if script.steps else script.fallback
        self._run(step, body if isinstance(body, dict) else {})

    def _run(self, step: Any, body: dict[str, Any]) -> None:
        if isinstance(step, Delay):
            time.sleep(step.seconds)
            step = step.then
        if step is None:
            path = self.path.rstrip("/")
            if path.endswith("/embeddings"):
                step = Embeddings(self.server.script.embedding_dim)
            elif path.endswith("/responses"):
                step = (Status(404, "Unknown path /v1/responses") if not self.server.script.responses
                        else Stream(response_events(body), done=False) if body.get("stream")
                        else Reply(response_object(body)))
            elif path.endswith("/completions") and not path.endswith("/chat/completions"):
                prompt = body.get("prompt")  # a choice per prompt of a list (not of token ids)
                prompts = (len(prompt) if isinstance(prompt, list) and prompt
                           and not isinstance(prompt[0], int) else 1)
                step = (Stream(text_stream(prompts=prompts)) if body.get("stream")
                        else Reply(text_completion([DEFAULT_TEXT] * prompts)))
            elif body.get("stream"):
                include = bool((body.get("stream_options") or {}).get("include_usage"))
                step = Stream(default_stream(usage=include))
            else:
                step = Reply(completion())
        if isinstance(step, Reply):
            self._json(step.status, step.body)
        elif isinstance(step, Status):
            etype = "invalid_request_error" if step.status < 500 else "server_error"
            self._json(step.status, {"error": {"message": step.message, "type": etype,
                                                "param": None, "code": step.code}},
                       step.headers)
        elif isinstance(step, Embeddings):
            self._json(200, embeddings_reply(body, step.dim))
        elif isinstance(step, Malformed):
            self._send(200, step.body, "application/json")
        elif isinstance(step, Raw):
            self._send(step.status, step.body, step.content_type)
        elif isinstance(step, Stream):
            self._stream(step)
        else:
            raise TypeError(f"unknown step {step!r}")

    def _json(self, status: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, step: Stream) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for c in step.chunks:
            if isinstance(c, Delay):
                time.sleep(c.seconds)
            elif isinstance(c, bytes):
                self._chunk(c)
            else:
                self._chunk(b"data: " + json.dumps(c).encode() + b"\n\n")
        if step.cut:
            # Half a chunk, then hang up: the client sees a broken body.
            self.wfile.write(b"40\r\ndata: {\"id\"")
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if step.done:
            self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    script: _Script

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-reply are part of the scripts


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, record: bool = True,
                 embedding_dim: int = 384, responses: bool = False) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.script = _Script(record=record, embedding_dim=embedding_dim,
                                      responses=responses)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL to configure as ``api_base``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def history(self) -> list[Recorded]:
        return self._server.script.history

    def enqueue(self, *steps: Any) -> None:
        with self._server.script.lock:
            self._server.script.steps.extend(steps)

    @property
    def fallback(self) -> Any:
        """The step every request takes while none is queued; None: the default reply."""
        return self._server.script.fallback

    @fallback.setter
    def fallback(self, step: Any) -> None:
        with self._server.script.lock:
            self._server.script.fallback = step

    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted fake OpenAI-compatible upstream.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--responses", action="store_true", help="serve the Responses API too")
    args = parser.parse_args()
    upstream = FakeUpstream(port=args.port, record=False, responses=args.responses)
    print(upstream.port, flush=True)
    upstream._server.serve_forever()


if __name__ == "__main__":
    main()
