"""The memory and cube API: thin routes over the memory service's admin side
(:class:`memory.admin.MemoryAdmin`).

Every route is tenant-scoped by the caller's key; store work runs off the event loop.
Bodies are read by :func:`proxy.protocol.read_body`, so a bad one fails as the chat
body does (same checks, same messages), never through FastAPI's generic parse error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from memory.admin import MemoryAdmin
from proxy import headers as h
from proxy.auth import principal_of, require_key
from proxy.context import context
from proxy.errors import InvalidRequestError
from proxy.memories.protocol import (
    CubeIn,
    MemoriesIn,
    MemoryIn,
    MemoryPatch,
    MergeIn,
    PurgeIn,
    SearchIn,
    listing,
    scored,
    sources,
)
from proxy.protocol import MAX_ID_LENGTH, read_body, read_object, validate

router = APIRouter(dependencies=[Depends(require_key)])
T = TypeVar("T")
# Ids in the path: one longer than any id is a 400 naming it, not a 404 echoing it.
MemoryId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]
CubeId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]


def admin(request: Request) -> MemoryAdmin:
    return context(request).memory_service().admin


def tenant(request: Request) -> str:
    """The tenant whose memories a call reads or writes. With auth on, an admin key must
    name it (``X-Memcube-Tenant``): an admin holds no memories of its own."""
    principal = principal_of(request)
    if (principal.admin and request.headers.get(h.TENANT) is None
            and context(request).settings.auth.enabled):
        raise InvalidRequestError(
            "An admin key acts for a tenant here: name it with the X-Memcube-Tenant header "
            "(e.g. 'X-Memcube-Tenant: acme').", param="X-Memcube-Tenant",
            code="tenant_required")
    return principal.tenant


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def caller_user(request: Request, explicit: str | None) -> str:
    return explicit or request.headers.get(h.USER) or "default"


@router.post("/v1/memories")
async def create_memory(request: Request) -> dict[str, Any]:
    """One memory, or several as ``{"items": [...]}`` (one embedding batch)."""
    mem, t = admin(request), tenant(request)
    raw = await read_object(request)
    body = validate(MemoriesIn, raw) if "items" in raw else validate(MemoryIn, raw)
    if isinstance(body, MemoriesIn):
        specs = [{**m.model_dump(exclude={"sources"}), "user": caller_user(request, m.user),
                  "sources": sources(m.sources)} for m in body.items]
        made = await run(mem.create_many, t, specs)
        return listing([m.api() for m in made])
    item = await run(mem.create, t, caller_user(request, body.user), body.text,
                     cube_id=body.cube_id, context=body.context, type=body.type, tags=body.tags,
                     pinned=body.pinned, created_at=body.created_at, sources=sources(body.sources))
    return item.api()


@router.get("/v1/memories")
async def list_memories(request: Request,
                        user: str | None = Query(default=None, max_length=MAX_ID_LENGTH),
                        cube_id: str | None = Query(default=None, max_length=MAX_ID_LENGTH),
                        status: Literal["active", "archived", "deleted", "all"] = "active",
                        limit: int = Query(default=100, ge=1, le=1000),
                        after: str | None = Query(default=None, max_length=200)
                        ) -> dict[str, Any]:
    try:
        items, cursor = await run(admin(request).list_items, tenant(request), user=user,
                                  cube_id=cube_id, status=None if status == "all" else status,
                                  limit=limit, cursor=after)
    except ValueError:
        raise InvalidRequestError("Invalid 'after' cursor.", param="after") from None
    return listing([i.api() for i in items], cursor)


@router.post("/v1/memories/search")
async def search_memories(request: Request) -> dict[str, Any]:
    body = await read_body(request, SearchIn)
    hits = await run(admin(request).search, tenant(request), body.query, user=body.user,
                     cube_ids=body.cubes, top_k=body.top_k, statuses=body.status)
    return listing(scored(hits))


@router.post("/v1/memories/flush")
async def flush_memories(request: Request) -> dict[str, Any]:
    await context(request).memory_service().flush()
    return {"object": "memory.flush", "flushed": True}


@router.post("/v1/memories/purge")
async def purge_memories(request: Request) -> dict[str, Any]:
    body = await read_body(request, PurgeIn)
    ctx = context(request)
    service = ctx.memory_service()
    await service.flush()  # what the user said just now is erased too
    removed = await run(service.admin.purge_user, tenant(request), body.user)
    # Their stored responses (/v1/responses) hold what they said too.
    responses = await run(ctx.responses.purge_user, tenant(request), body.user) if (
        ctx.responses is not None) else 0
    return {"object": "memory.purge", "user": body.user, "deleted": removed,
            "responses_deleted": responses}


@router.get("/v1/memories/{memory_id}")
async def get_memory(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    return (await run(admin(request).get, tenant(request), memory_id)).api()


@router.patch("/v1/memories/{memory_id}")
async def patch_memory(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    body = await read_body(request, MemoryPatch)
    item = await run(admin(request).patch, tenant(request), memory_id,
                     body.model_dump(exclude_none=True))
    return item.api()


@router.delete("/v1/memories/{memory_id}")
async def delete_memory(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    item = await run(admin(request).delete, tenant(request), memory_id)
    return {"id": item.id, "object": "memory.deleted", "deleted": True, "version": item.version}


@router.get("/v1/memories/{memory_id}/history")
async def memory_history(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    versions = await run(admin(request).history, tenant(request), memory_id)
    return listing([v.api() for v in versions])


@router.post("/v1/cubes")
async def create_cube(request: Request) -> dict[str, Any]:
    body = await read_body(request, CubeIn)
    cube = await run(admin(request).create_cube, tenant(request), body.name,
                     description=body.description, cube_id=body.id)
    return cube.api()


@router.get("/v1/cubes")
async def list_cubes(request: Request) -> dict[str, Any]:
    cubes = await run(admin(request).list_cubes, tenant(request))
    return listing([c.api() for c in cubes])


@router.post("/v1/cubes/import")
async def import_cube(request: Request,
                      id: str | None = Query(default=None, min_length=1, max_length=128,
                                             pattern=r"^[A-Za-z0-9_.:-]+$")) -> dict[str, Any]:
    """Restore an export, or with ``?id=NEW`` copy it under a new cube id."""
    mem, body = admin(request), await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Replacing bad bytes would store text the exporter never wrote.
        line = body.count(b"\n", 0, exc.start) + 1
        raise InvalidRequestError(f"line {line}: not valid UTF-8 (byte 0x{body[exc.start]:02x})."
                                  ) from None
    try:
        cube, count = await run(mem.import_cube, tenant(request), text.splitlines(), id)
    except RecursionError:
        raise InvalidRequestError("A line of the export is nested too deeply for JSON.") from None
    return {**cube.api(), "imported": count}


@router.get("/v1/cubes/{cube_id}")
async def get_cube(request: Request, cube_id: CubeId) -> dict[str, Any]:
    cube, count = await run(admin(request).cube_with_count, tenant(request), cube_id)
    return {**cube.api(), "memories": count}


@router.delete("/v1/cubes/{cube_id}")
async def delete_cube(request: Request, cube_id: CubeId) -> dict[str, Any]:
    removed = await run(admin(request).delete_cube, tenant(request), cube_id)
    return {"id": cube_id, "object": "cube.deleted", "deleted": True, "memories_deleted": removed}


@router.get("/v1/cubes/{cube_id}/export")
async def export_cube(request: Request, cube_id: CubeId) -> StreamingResponse:
    mem, t = admin(request), tenant(request)
    lines = await run(lambda: list(mem.export_cube(t, cube_id)))
    return StreamingResponse(iter(lines), media_type="application/x-ndjson")


@router.post("/v1/cubes/{cube_id}/merge")
async def merge_cube(request: Request, cube_id: CubeId) -> JSONResponse:
    body = await read_body(request, MergeIn)
    copied = await run(admin(request).merge_cubes, tenant(request), body.source, cube_id)
    return JSONResponse({"id": cube_id, "object": "cube.merge", "source": body.source,
                         "copied": copied})
