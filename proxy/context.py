"""What the app's routes share, and its lifetime: an :class:`AppContext`.

Built once by :mod:`proxy.wiring` (the composition root) and kept as
``app.state.context``; routes reach it through :func:`context`. It starts and stops
what it holds, in order: tenants' saved changes, backends, adapters, then memory
(loading the embedder takes seconds, so memory is opened at start, off the loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from memory.layer import MemoryLayer, NullMemory
from memory.service import MemoryService
from proxy.admin.adapters import AdapterRegistry
from proxy.admin.tenants import TenantRegistry
from proxy.auth import RateLimiter
from proxy.backends.base import ChatBackend
from proxy.errors import ModelNotFoundError, NotFoundError
from proxy.observability import Metrics
from proxy.responses.store import ResponseStore
from proxy.settings import Settings
from proxy.startup import StartupError
from proxy.traces import Traces
from proxy.upstreams import UpstreamHealth

if TYPE_CHECKING:
    from proxy.embeddings.local import LocalEmbeddings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AppContext:
    settings: Settings
    backends: dict[str, ChatBackend]
    adapters: AdapterRegistry
    tenants: TenantRegistry
    metrics: Metrics
    started_at: int
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    #: Opens the memory service (off the event loop) at start; None: none is opened.
    open_memory: Callable[[], MemoryService] | None = None
    #: What requests recall through: the service once open, a given layer, or nothing.
    layer: MemoryLayer = field(default_factory=NullMemory)
    #: The memory service, for the memory API, health and metrics (None: memory is off).
    memory: MemoryService | None = None
    #: Responses kept with ``store: true`` (None: retention 0, none are kept).
    responses: ResponseStore | None = None
    #: The embedded MiniLM on /v1/embeddings (None: embeddings.local_model is null).
    embeddings: LocalEmbeddings | None = None
    #: Records of requests sent with X-Memcube-Debug (proxy/traces.py).
    traces: Traces = field(default_factory=Traces)
    #: Upstream models' keys and reachability, for /healthz (None: not watched).
    upstreams: UpstreamHealth | None = None
    _started: list[ChatBackend] = field(default_factory=list)
    _opened: MemoryService | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, MemoryService):
            self.memory = self.layer

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.tenants.load()  # with the tenants the admin API added
        if self.responses is not None:
            await asyncio.to_thread(self.responses.open)
        for name, backend in self.backends.items():
            try:
                await backend.start()
            except (ValueError, OSError) as exc:  # a model file that is missing or no GGUF
                raise StartupError(f"model '{name}' cannot start: {exc}") from None
            self._started.append(backend)
        try:
            await self.adapters.start()
        except ValueError as exc:  # a configured adapter that does not fit the model
            raise StartupError(f"{exc}; fix the file (`memcube-proxy adapters inspect FILE` "
                               "says why) or remove the adapter") from None
        if self.upstreams is not None:
            self.upstreams.start()  # warns of unset keys, probes in the background
        if self.open_memory is not None:
            service = await asyncio.to_thread(self.open_memory)
            self._opened = service
            await service.start()
            self.memory = self.layer = service
            if self.settings.memory.anonymous == "off":
                log.info("memory.anonymous: off: requests that name no user (X-Memcube-User "
                         "or the body's `user`) get no memory")
            else:
                log.warning("memory.anonymous: shared: requests that name no user all share "
                            "the memories of the user 'default'")

    async def stop(self) -> None:
        if self.upstreams is not None:
            await self.upstreams.close()
        service, self._opened = self._opened, None
        if service is not None:
            await service.stop()
            await asyncio.to_thread(service.close)
        for backend in self._started:
            await backend.close()
        self._started.clear()
        if self.embeddings is not None:
            await asyncio.to_thread(self.embeddings.close)
        if self.responses is not None:
            self.responses.close()

    def backend(self, model: str) -> ChatBackend:
        """The backend serving ``model``, or a 404 ``model_not_found``."""
        found = self.backends.get(model)
        if found is None:
            raise ModelNotFoundError(model)
        return found

    def memory_service(self) -> MemoryService:
        """The memory service, or a 404 saying memory is off."""
        if self.memory is None:
            raise NotFoundError("Memory is disabled on this proxy (memory.enabled: false).")
        return self.memory


def context(request: Request) -> AppContext:
    ctx = request.app.state.context
    assert isinstance(ctx, AppContext)
    return ctx
