"""The proxy's own small routes: ``GET /v1/models``, ``GET /healthz`` (no key needed)
and ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.auth import require_key
from proxy.context import context

router = APIRouter(dependencies=[Depends(require_key)])
public = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    ctx = context(request)
    names = [cfg.name for cfg in ctx.settings.models]
    if ctx.embeddings is not None:  # the embedded MiniLM, on /v1/embeddings
        names.append(ctx.embeddings.name)
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": ctx.started_at, "owned_by": "memcube-proxy"}
            for name in names
        ],
    }


@public.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    ctx = context(request)
    models = {name: ("ready" if b.ready else "loading") for name, b in ctx.backends.items()}
    ok = all(v == "ready" for v in models.values())
    body: dict[str, Any] = {"status": "ok" if ok else "starting", "models": models}
    if ctx.memory is not None:  # degraded memory is reported, never a failed liveness check
        # Whether requests that name no user share memory: an operator sees it at a glance.
        body["memory"] = {**ctx.memory.health(), "anonymous": ctx.settings.memory.anonymous}
    if ctx.upstreams is not None and ctx.upstreams.upstreams:
        # Key set, upstream reachable: probed in the background, never in the status code.
        body["upstreams"] = ctx.upstreams.report()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(context(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
