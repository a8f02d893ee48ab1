"""HTTP routes: thin; the logic lives in :mod:`proxy.serving`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.auth import authenticate, require_key
from proxy.protocol import check_json_content_type

router = APIRouter(dependencies=[Depends(require_key)])
public = APIRouter()

async def chat_completions(request: Request) -> Response:
    """The hot path, mounted as a plain Starlette route: FastAPI's dependency
    resolution cost more per request than the rest of the relay (bench/overhead.py)."""
    authenticate(request)
    check_json_content_type(request.headers.get("content-type"))
    return await request.app.state.chat.handle(request)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = request.app.state.started_at
    return {
        "object": "list",
        "data": [
            {"id": cfg.name, "object": "model", "created": created, "owned_by": "memcube-proxy"}
            for cfg in request.app.state.settings.models
        ],
    }


@public.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    backends = request.app.state.chat.backends
    models = {name: ("ready" if b.ready else "loading") for name, b in backends.items()}
    ok = all(v == "ready" for v in models.values())
    body: dict[str, Any] = {"status": "ok" if ok else "starting", "models": models}
    service = request.app.state.memory_service
    if service is not None:  # degraded memory is reported, never a failed liveness check
        body["memory"] = service.health()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
