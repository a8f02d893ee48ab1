"""Upstream models' health for ``/healthz``: whether each one's key variable is set, and
whether its ``api_base`` accepts a connection, probed in the background and cached.

A probe is a TCP connect to the host and port of the base URL the model's requests go
to (no HTTP request: nothing is logged, counted or billed upstream), within
``upstream.connect_timeout``. It runs at start and again when ``/healthz`` finds the
last one over :data:`PROBE_EVERY_S` old; ``/healthz`` never waits for it. A hosted
provider litellm finds by itself (no ``api_base``) is reported ``configured``, not
probed. None of it touches liveness: a proxy with every upstream down still answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.backends import base_url_of, key_env_of
from proxy.settings import ModelConfig, Settings

log = logging.getLogger(__name__)

#: Seconds a probe's result is served before ``/healthz`` starts the next one.
PROBE_EVERY_S = 30.0

State = Literal["unknown", "reachable", "unreachable", "configured"]
KeyState = Literal["set", "missing", "none"]


@dataclass
class Upstream:
    name: str
    index: int
    #: The variable its key is read from (None: none is configured).
    key_env: str | None
    key: KeyState
    #: Host and port its requests go to; None: not probed (``state`` says why).
    address: tuple[str, int] | None
    #: ``key_env`` is the model's ``api_key_env``, not its provider's usual variable.
    explicit_key: bool = False
    state: State = "unknown"
    checked_at: int | None = None
    error: str | None = None

    def shown(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"state": self.state, "key": self.key,
                                 "checked_at": self.checked_at}
        if self.error is not None:
            shown["error"] = self.error
        return shown


def describe(index: int, cfg: ModelConfig) -> Upstream:
    var = key_env_of(cfg)
    if var and os.environ.get(var):
        key: KeyState = "set"
    elif var and (cfg.api_key_env or not cfg.api_base):
        key = "missing"
    else:  # a keyless server at an api_base (Ollama, vLLM), or litellm's own lookup
        key = "none"
    up = Upstream(cfg.name, index, var, key, None, explicit_key=bool(cfg.api_key_env))
    base = base_url_of(cfg)
    if base is None:
        up.state = "configured"
        return up
    parts = urlsplit(base)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if not parts.hostname or not port:
        up.error = "api_base names no host and port"
        return up
    up.address = (parts.hostname, port)
    return up


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no connection within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


class UpstreamHealth:
    """The upstream models of one app (``backend: litellm``) and their last probe."""

    def __init__(self, settings: Settings) -> None:
        self.upstreams = [describe(i, cfg) for i, cfg in enumerate(settings.models)
                          if cfg.backend == "litellm"]
        self.timeout = settings.upstream.connect_timeout
        self._task: asyncio.Task[None] | None = None
        self._started_at: float | None = None

    def start(self) -> None:
        """At start-up: warn of every key variable that is not set, and probe."""
        for up in self.upstreams:
            if up.key != "missing":
                continue
            what = ("its api_key_env" if up.explicit_key
                    else "the usual key variable of its provider")
            log.warning("model '%s' (models[%d]): %s %s is not set, so its requests go "
                        "without a key and the upstream will likely refuse them; export %s "
                        "or set models[%d].api_key_env", up.name, up.index, what,
                        up.key_env, up.key_env, up.index)
        self._refresh()

    def report(self) -> dict[str, dict[str, Any]]:
        """Each upstream's last known state; starts a probe in the background when the
        last one is over :data:`PROBE_EVERY_S` old (never waits for it)."""
        self._refresh()
        return {up.name: up.shown() for up in self.upstreams}

    def _refresh(self) -> None:
        if not any(up.address for up in self.upstreams):
            return
        if self._task is not None and not self._task.done():
            return
        now = time.monotonic()
        if self._started_at is not None and now - self._started_at < PROBE_EVERY_S:
            return
        self._started_at = now
        self._task = asyncio.get_running_loop().create_task(self.probe())

    async def probe(self) -> None:
        """Connect to every address once (models sharing one share the result)."""
        addresses = list(dict.fromkeys(up.address for up in self.upstreams if up.address))
        results = await asyncio.gather(*(self._connect(*a) for a in addresses))
        found = dict(zip(addresses, results, strict=True))
        checked = int(time.time())
        for up in self.upstreams:
            if up.address is not None:
                up.error = found[up.address]
                up.state = "reachable" if up.error is None else "unreachable"
                up.checked_at = checked

    async def _connect(self, host: str, port: int) -> str | None:
        """None when ``host:port`` accepts a connection, else why not."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        except (OSError, TimeoutError) as exc:
            return _why(exc, self.timeout)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
