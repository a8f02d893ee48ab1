"""Run an app under real uvicorn on a loopback port, in a thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

from proxy.context import AppContext

T = TypeVar("T")


@dataclass
class Live:
    app: FastAPI
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def context(self) -> AppContext:
        """What the app's routes share: its backends, registries and memory service."""
        ctx = self.app.state.context
        assert isinstance(ctx, AppContext)
        return ctx

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's loop (to await its background work)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: FastAPI) -> Iterator[Live]:
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted
    # connections only when their proto says TCP. Without it, a response written as
    # headers then body waited on the client's delayed ACK: 44 ms per request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if errors or not thread.is_alive():
            raise RuntimeError(f"server failed to start: {errors}")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start in 30 s")
        time.sleep(0.01)
    try:
        yield Live(app=app, port=port, loop=loop)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
