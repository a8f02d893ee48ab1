"""The app factory: ``create_app(settings)`` mounts the routes and the middleware on the
context :mod:`proxy.wiring` builds, and turns every failure into one error shape."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from memory.errors import MemoryLayerError
from memory.layer import MemoryLayer
from proxy.admin.router import router as admin_router
from proxy.chat.router import chat_route
from proxy.completions.router import completions_route
from proxy.embeddings.router import embeddings_route
from proxy.errors import (
    InvalidRequestError,
    NotFoundError,
    ProxyError,
    error_response,
    error_type_for_status,
    from_memory_error,
)
from proxy.memories.router import router as memory_router
from proxy.observability import ProxyMiddleware
from proxy.passthrough import Passthrough
from proxy.protocol import invalid_from_errors
from proxy.responses.router import responses_route
from proxy.responses.router import router as responses_router
from proxy.routes import public, router
from proxy.settings import Settings
from proxy.state import request_state
from proxy.traces import router as traces_router
from proxy.wiring import build_context

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, memory: MemoryLayer | None = None) -> FastAPI:
    """Build the app. ``memory``: a memory layer to use instead of the one the settings
    describe (tests pass fakes and services built on faulty stores)."""
    ctx = build_context(settings, memory=memory)
    passthrough = Passthrough(settings.passthrough, connect_timeout=settings.upstream.connect_timeout,
                              max_connections=settings.upstream.max_connections)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await ctx.start()
            yield
        finally:
            await ctx.stop()
            await passthrough.close()

    app = FastAPI(title="MemCube Proxy", version="0.1.0", lifespan=lifespan)
    app.state.context = ctx
    _warn_about_auth(settings)
    app.router.routes.append(chat_route(ctx))
    app.router.routes.append(embeddings_route(ctx))
    app.router.routes.append(completions_route(ctx))
    app.router.routes.append(responses_route(ctx))
    app.include_router(router)
    app.include_router(memory_router)
    app.include_router(admin_router)
    app.include_router(responses_router)
    app.include_router(public)
    app.include_router(traces_router)
    # Other /v1 paths: whatever no route matched, however routes are added, is relayed.
    passthrough.install(app.router)
    app.add_middleware(ProxyMiddleware, metrics=ctx.metrics, max_body_bytes=settings.max_body_bytes)
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
        request_state(request).error_type = exc.type
        return error_response(exc)

    @app.exception_handler(ProxyError)
    async def on_proxy_error(request: Request, exc: ProxyError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return respond(request, exc)

    @app.exception_handler(MemoryLayerError)
    async def on_memory_error(request: Request, exc: MemoryLayerError) -> Response:
        return respond(request, from_memory_error(exc))

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
