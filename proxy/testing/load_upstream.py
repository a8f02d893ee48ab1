"""A fast OpenAI-compatible upstream on bare asyncio, for load runs.

The scripted :mod:`proxy.testing.fake_upstream` spends a thread per connection and
scripts every request; under hundreds of concurrent streams that upstream, not the
proxy, would be what is measured. This one answers every chat request with the same
reply, encoded once at start: streamed as a role chunk, ``chunks`` content chunks
(``delay`` seconds apart, like a model producing tokens), a finish chunk, a usage chunk
when ``stream_options.include_usage`` asks, and ``[DONE]``; or as one completion.

    with running(chunks=4, delay=0.01) as up:   # in a thread, for tests
        ...up.url...   # the api_base to configure; up.requests counts chat requests

Run alone (benchmarks start it as its own process, off the client's GIL):
``python -m proxy.testing.load_upstream --port 0`` prints the port, then serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from proxy.testing.fake_upstream import DEFAULT_TEXT, chunk, completion

MAX_HEAD = 64 * 1024
_NOT_FOUND = json.dumps({"error": {"message": "not found", "type": "not_found_error",
                                   "param": None, "code": None}}).encode()
_MODELS = json.dumps({"object": "list",
                      "data": [{"id": "fake-model", "object": "model"}]}).encode()


def split_text(text: str, parts: int) -> list[str]:
    """``text`` cut into ``parts`` pieces at word boundaries where it can be (joined
    again they give ``text`` exactly)."""
    words = text.split(" ")
    parts = max(1, min(parts, len(words)))
    size, extra = divmod(len(words), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        pieces.append(" ".join(words[start:end]) + (" " if end < len(words) else ""))
        start = end
    return pieces


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _frame(payload: dict[str, Any]) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    return _chunked(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


class LoadUpstream:
    """The server; start it on a running loop with :meth:`start`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, text: str = DEFAULT_TEXT,
                 chunks: int = 4, delay: float = 0.0) -> None:
        self.host, self.port = host, port
        self.text, self.delay = text, delay
        self.requests = 0  # chat completion requests answered (or being answered)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._head = [_frame(chunk("", role="assistant"))]
        self._body = [_frame(chunk(piece)) for piece in split_text(text, chunks)]
        self._tail = _frame(chunk(finish="stop"))
        words = len(text.split())
        self._usage = _frame({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                              "created": 1700000000, "model": "fake-model", "choices": [],
                              "usage": {"prompt_tokens": 5, "completion_tokens": words,
                                        "total_tokens": 5 + words}})
        self._done = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self._completion = json.dumps(completion(text)).encode()

    @property
    def url(self) -> str:
        """The base URL to configure as ``api_base``."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # idle keep-alive connections too
                writer.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that hangs up or speaks nonsense loses its connection, nothing else
        finally:
            self._writers.discard(writer)
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its reply; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return False  # closed between requests: the normal end of a keep-alive
        if len(head) > MAX_HEAD:
            raise ValueError("request head too large")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        raw = await _read_body(reader, headers)
        keep = headers.get("connection", "").lower() != "close"
        path = path.split("?", 1)[0].rstrip("/")
        if method == "POST" and path.endswith("/chat/completions"):
            self.requests += 1
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                await _send(writer, 400, b'{"error": {"message": "body is not a JSON object", '
                            b'"type": "invalid_request_error", "param": null, "code": null}}')
            elif body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await self._stream(writer, usage)
            else:
                await _send(writer, 200, self._completion)
        elif method == "GET" and path.endswith("/models"):
            await _send(writer, 200, _MODELS)
        else:
            await _send(writer, 404, _NOT_FOUND)
        return keep

    async def _stream(self, writer: asyncio.StreamWriter, usage: bool) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.writelines(self._head)
        for piece in self._body:
            if self.delay:
                await writer.drain()
                await asyncio.sleep(self.delay)
            writer.write(piece)
        writer.write(self._tail)
        if usage:
            writer.write(self._usage)
        writer.write(self._done)
        await writer.drain()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent to an upstream
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])
    length = int(headers.get("content-length") or 0)
    return await reader.readexactly(length) if length else b""


async def _send(writer: asyncio.StreamWriter, status: int, data: bytes) -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


@contextmanager
def running(**options: Any) -> Iterator[LoadUpstream]:
    """A :class:`LoadUpstream` on its own event loop in a daemon thread."""
    upstream = LoadUpstream(**options)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(upstream.start())
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            return
        finally:
            started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="load-upstream", daemon=True)
    thread.start()
    started.wait(30)
    if errors:
        raise RuntimeError(f"load upstream failed to start: {errors[0]!r}")
    try:
        yield upstream
    finally:
        asyncio.run_coroutine_threadsafe(upstream.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


async def _serve_forever(upstream: LoadUpstream) -> None:
    await upstream.start()
    print(upstream.port, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fast fixed-reply OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--chunks", type=int, default=4, help="content chunks per streamed reply")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between content chunks")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the reply")
    args = parser.parse_args()
    upstream = LoadUpstream(host=args.host, port=args.port, text=args.text, chunks=args.chunks,
                            delay=args.delay)
    with suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(upstream))


if __name__ == "__main__":
    main()
