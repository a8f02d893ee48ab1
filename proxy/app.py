"""The app factory: ``create_app(settings)`` wires settings, backends, memory and routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from memory.activation import StateCache
from memory.errors import (
    InvalidMemoryRequest,
    MemoryLayerError,
    MemoryNotFound,
    MemoryUnavailable,
)
from memory.layer import MemoryLayer, NullMemory
from memory.service import MemoryService
from proxy.adapters import AdapterRegistry
from proxy.adapters import router as adapter_router
from proxy.auth import RateLimiter
from proxy.backends import ChatBackend, build_backend
from proxy.errors import (
    InvalidRequestError,
    NotFoundError,
    ProxyError,
    error_response,
    error_type_for_status,
)
from proxy.memory_routes import router as memory_router
from proxy.observability import Metrics, ProxyMiddleware
from proxy.protocol import invalid_from_errors
from proxy.routes import chat_completions, public, router
from proxy.serving import ChatService
from proxy.settings import ModelConfig, Settings
from proxy.tenants import TenantRegistry
from proxy.tenants import router as tenant_router

log = logging.getLogger(__name__)


def activation_states(settings: Settings, cfg: ModelConfig) -> StateCache | None:
    """Where a local model keeps its saved activation states, if activation is on."""
    act = settings.activation
    if cfg.backend != "llamacpp" or not act.enabled or not settings.memory.enabled:
        return None
    directory = settings.data_dir / "activation" / cfg.name if act.disk_bytes else None
    return StateCache(directory, ram_bytes=act.ram_bytes, disk_bytes=act.disk_bytes)


def create_app(
    settings: Settings,
    *,
    backends: dict[str, ChatBackend] | None = None,
    memory: MemoryLayer | None = None,
) -> FastAPI:
    """Build the app. ``backends`` replaces those built from settings (tests pass fakes)."""
    if backends is None:
        backends = {cfg.name: build_backend(cfg, settings.upstream, activation_states(settings, cfg))
                    for cfg in settings.models}
    adapters = AdapterRegistry(settings, backends)
    chat = ChatService(backends, memory or NullMemory(), adapters)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.keys = tenants.load()  # with the tenants the admin API added
        started: list[ChatBackend] = []
        service: MemoryService | None = None
        try:
            for backend in backends.values():
                await backend.start()
                started.append(backend)
            await adapters.start()
            if memory is None and settings.memory.enabled:
                from proxy.memory_wiring import build_memory

                # Loading the embedder (converting it on first run) takes seconds.
                service = await asyncio.to_thread(build_memory, settings, backends)
                await service.start()
                chat.memory = service
                app.state.memory_service = service
            yield
        finally:
            if service is not None:
                await service.stop()
                await asyncio.to_thread(service.close)
            for backend in started:
                await backend.close()

    app = FastAPI(title="MemCube Proxy", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.chat = chat
    app.state.metrics = Metrics()
    app.state.metrics.watch_activation(backends)
    app.state.metrics.watch_memory(lambda: app.state.memory_service)
    app.state.adapters = adapters
    app.state.started_at = int(time.time())
    app.state.memory_service = memory if isinstance(memory, MemoryService) else None
    tenants = TenantRegistry(settings)
    app.state.tenants = tenants
    app.state.keys = tenants.keyring()
    app.state.rate_limiter = RateLimiter()
    _warn_about_auth(settings)
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.include_router(router)
    app.include_router(memory_router)
    app.include_router(adapter_router)
    app.include_router(tenant_router)
    app.include_router(public)
    app.add_middleware(
        ProxyMiddleware, metrics=app.state.metrics, max_body_bytes=settings.max_body_bytes
    )
    _install_error_handlers(app)
    return app


def _warn_about_auth(settings: Settings) -> None:
    keys = sum(len(t.api_keys) for t in settings.tenants)
    if not settings.auth.enabled and keys:
        log.warning("auth.enabled is false: the %s tenant keys in the config are ignored and "
                    "every caller is tenant 'default' with admin rights", keys)
    if settings.auth.enabled and not keys and not settings.auth.admin_keys:
        log.warning("auth.enabled is true but no keys are configured: every request but "
                    "/healthz will be refused")


def _install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, exc: ProxyError) -> Response:
        request.scope.setdefault("state", {})["error_type"] = exc.type
        return error_response(exc)

    @app.exception_handler(ProxyError)
    async def on_proxy_error(request: Request, exc: ProxyError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return respond(request, exc)

    @app.exception_handler(MemoryLayerError)
    async def on_memory_error(request: Request, exc: MemoryLayerError) -> Response:
        err: ProxyError
        if isinstance(exc, MemoryNotFound):
            err = NotFoundError(exc.message, param=exc.param)
        elif isinstance(exc, InvalidMemoryRequest):
            err = InvalidRequestError(exc.message, param=exc.param)
        elif isinstance(exc, MemoryUnavailable):
            err = ProxyError(exc.message, status=exc.status, type=exc.type, code=exc.code)
        else:
            err = ProxyError(exc.message)
        return respond(request, err)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's locations start with where the value was: body, query, path, header.
        errors = [{**e, "loc": tuple(e["loc"])[1:]} for e in exc.errors()]
        return respond(request, invalid_from_errors(errors, getattr(exc, "body", None)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        cause = exc.__cause__
        if isinstance(cause, ProxyError):  # e.g. the body limit, hit while FastAPI read it
            return respond(request, cause)
        if exc.status_code == 404:
            path = request.url.path
            shown = path if len(path) <= 200 else f"{path[:200]}..."
            err: ProxyError = NotFoundError(f"Unknown path: {shown}")
        elif exc.status_code < 500:
            err = InvalidRequestError(str(exc.detail), status=exc.status_code,
                                      type=error_type_for_status(exc.status_code))
        else:
            err = ProxyError(str(exc.detail), status=exc.status_code)
        return respond(request, err)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return respond(request, ProxyError("Internal server error", code="internal_error"))
