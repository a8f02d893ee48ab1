"""The memory and cube API: thin routes over :class:`memory.service.MemoryService`.

Every route is tenant-scoped by the caller's key; store calls run off the event loop.
Bodies are read by :func:`proxy.protocol.read_body`, so a bad one fails as the chat
body does (same checks, same messages), never through FastAPI's generic parse error.
Lists answer ``{"object": "list", "data": [...], "has_more": bool}``; a page's
``next_after`` is the cursor for ``?after=``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from memory.models import MAX_TIME, MemoryItem, MemoryStatus, MemoryType, Source
from memory.service import MemoryService
from memory.store.base import Hit
from proxy.auth import Principal, require_key
from proxy.errors import InvalidRequestError, NotFoundError
from proxy.protocol import MAX_CUBES, MAX_ID_LENGTH, read_body, read_object, validate
from proxy.serving import USER_HEADER

router = APIRouter(dependencies=[Depends(require_key)])
T = TypeVar("T")
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
Tag = Annotated[str, Field(max_length=MAX_ID_LENGTH)]
# Ids in the path: one longer than any id is a 400 naming it, not a 404 echoing it.
MemoryId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]
CubeId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]


def service(request: Request) -> MemoryService:
    svc: MemoryService | None = request.app.state.memory_service
    if svc is None:
        raise NotFoundError("Memory is disabled on this proxy (memory.enabled: false).")
    return svc


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def listing(data: list[dict[str, Any]], next_after: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": next_after is not None}
    if next_after is not None:
        body["next_after"] = next_after
    return body


def scored(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{**h.item.api(), "score": round(h.score, 6)} for h in hits]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SourceIn(_Body):
    request_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    session_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    role: str = Field(default="user", max_length=64)
    at: int | None = Field(default=None, ge=0, le=MAX_TIME)
    ref: str | None = Field(default=None, max_length=MAX_ID_LENGTH)


class MemoryIn(_Body):
    text: str = Field(min_length=1, max_length=20000)
    context: str | None = Field(default=None, max_length=20000, description=(
        "What the memory was said in reply to: searched at a lower weight, never injected."))
    user: Id | None = None
    cube_id: Id | None = None
    type: MemoryType = "fact"
    tags: list[Tag] = Field(default_factory=list, max_length=64)
    pinned: bool = False
    created_at: int | None = Field(default=None, ge=0, le=MAX_TIME)
    sources: list[SourceIn] = Field(default_factory=list, max_length=64)


class MemoriesIn(_Body):
    items: list[MemoryIn] = Field(min_length=1, max_length=1000)


class MemoryPatch(_Body):
    text: str | None = Field(default=None, min_length=1, max_length=20000)
    type: MemoryType | None = None
    tags: list[Tag] | None = Field(default=None, max_length=64)
    pinned: bool | None = None
    status: MemoryStatus | None = None


class SearchIn(_Body):
    query: str = Field(min_length=1, max_length=20000)
    user: Id | None = None
    cubes: list[Id] | None = Field(default=None, max_length=MAX_CUBES)
    top_k: int = Field(default=10, ge=1, le=100)
    status: list[MemoryStatus] = Field(default=["active"], min_length=1)


class CubeIn(_Body):
    name: str = Field(min_length=1, max_length=200)
    id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str = Field(default="", max_length=2000)


class MergeIn(_Body):
    source: Id = Field(description="The cube whose memories are copied in.")


class PurgeIn(_Body):
    user: Id


def caller_user(request: Request, explicit: str | None) -> str:
    return explicit or request.headers.get(USER_HEADER) or "default"


def tenant(request: Request) -> str:
    principal: Principal = request.scope["state"]["principal"]
    return principal.tenant


def _sources(sources: list[SourceIn]) -> list[Source]:
    return [Source(**{k: v for k, v in s.model_dump().items() if v is not None})
            for s in sources]


@router.post("/v1/memories")
async def create_memory(request: Request) -> dict[str, Any]:
    """One memory, or several as ``{"items": [...]}`` (one embedding batch)."""
    svc, t = service(request), tenant(request)
    raw = await read_object(request)
    body = validate(MemoriesIn, raw) if "items" in raw else validate(MemoryIn, raw)
    if isinstance(body, MemoriesIn):
        specs = [{**m.model_dump(exclude={"sources"}), "user": caller_user(request, m.user),
                  "sources": _sources(m.sources)} for m in body.items]
        made = await run(svc.create_many, t, specs)
        return listing([m.api() for m in made])
    item = await run(svc.create, t, caller_user(request, body.user), body.text,
                     cube_id=body.cube_id, context=body.context, type=body.type, tags=body.tags,
                     pinned=body.pinned,
                     created_at=body.created_at, sources=_sources(body.sources))
    return item.api()


@router.get("/v1/memories")
async def list_memories(request: Request,
                        user: str | None = Query(default=None, max_length=MAX_ID_LENGTH),
                        cube_id: str | None = Query(default=None, max_length=MAX_ID_LENGTH),
                        status: MemoryStatus | None = None,
                        limit: int = Query(default=100, ge=1, le=1000),
                        after: str | None = Query(default=None, max_length=200)
                        ) -> dict[str, Any]:
    try:
        items, cursor = await run(service(request).store.list_items, tenant(request), user=user,
                                  cube_id=cube_id, status=status, limit=limit, cursor=after)
    except ValueError:
        raise InvalidRequestError("Invalid 'after' cursor.", param="after") from None
    return listing([i.api() for i in items], cursor)


@router.post("/v1/memories/search")
async def search_memories(request: Request) -> dict[str, Any]:
    body = await read_body(request, SearchIn)
    hits = await run(service(request).search, tenant(request), body.query, user=body.user,
                     cube_ids=body.cubes, top_k=body.top_k, statuses=body.status)
    return listing(scored(hits))


@router.post("/v1/memories/flush")
async def flush_memories(request: Request) -> dict[str, Any]:
    await service(request).flush()
    return {"object": "memory.flush", "flushed": True}


@router.post("/v1/memories/purge")
async def purge_memories(request: Request) -> dict[str, Any]:
    body = await read_body(request, PurgeIn)
    svc = service(request)
    await svc.flush()  # what the user said just now is erased too
    removed = await run(svc.purge_user, tenant(request), body.user)
    return {"object": "memory.purge", "user": body.user, "deleted": removed}


@router.get("/v1/memories/{memory_id}")
async def get_memory(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    item: MemoryItem = await run(service(request).get, tenant(request), memory_id)
    return item.api()


@router.patch("/v1/memories/{memory_id}")
async def patch_memory(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    body = await read_body(request, MemoryPatch)
    item = await run(service(request).patch, tenant(request), memory_id,
                     body.model_dump(exclude_none=True))
    return item.api()


@router.delete("/v1/memories/{memory_id}")
async def delete_memory(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    item = await run(service(request).delete, tenant(request), memory_id)
    return {"id": item.id, "object": "memory.deleted", "deleted": True, "version": item.version}


@router.get("/v1/memories/{memory_id}/history")
async def memory_history(request: Request, memory_id: MemoryId) -> dict[str, Any]:
    versions = await run(service(request).history, tenant(request), memory_id)
    return listing([v.api() for v in versions])


@router.post("/v1/cubes")
async def create_cube(request: Request) -> dict[str, Any]:
    body = await read_body(request, CubeIn)
    cube = await run(service(request).create_cube, tenant(request), body.name,
                     description=body.description, cube_id=body.id)
    return cube.api()


@router.get("/v1/cubes")
async def list_cubes(request: Request) -> dict[str, Any]:
    cubes = await run(service(request).store.list_cubes, tenant(request))
    return listing([c.api() for c in cubes])


@router.post("/v1/cubes/import")
async def import_cube(request: Request) -> dict[str, Any]:
    svc, body = service(request), await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Replacing bad bytes would store text the exporter never wrote.
        line = body.count(b"\n", 0, exc.start) + 1
        raise InvalidRequestError(f"line {line}: not valid UTF-8 (byte 0x{body[exc.start]:02x})."
                                  ) from None
    try:
        cube, count = await run(svc.import_cube, tenant(request), text.splitlines())
    except RecursionError:
        raise InvalidRequestError("A line of the export is nested too deeply for JSON.") from None
    return {**cube.api(), "imported": count}


@router.get("/v1/cubes/{cube_id}")
async def get_cube(request: Request, cube_id: CubeId) -> dict[str, Any]:
    svc, t = service(request), tenant(request)
    cube = await run(svc.get_cube, t, cube_id)
    return {**cube.api(), "memories": await run(svc.store.count, t, cube_id=cube_id)}


@router.delete("/v1/cubes/{cube_id}")
async def delete_cube(request: Request, cube_id: CubeId) -> dict[str, Any]:
    removed = await run(service(request).delete_cube, tenant(request), cube_id)
    return {"id": cube_id, "object": "cube.deleted", "deleted": True, "memories_deleted": removed}


@router.get("/v1/cubes/{cube_id}/export")
async def export_cube(request: Request, cube_id: CubeId) -> StreamingResponse:
    svc, t = service(request), tenant(request)
    lines = await run(lambda: list(svc.export_cube(t, cube_id)))
    return StreamingResponse(iter(lines), media_type="application/x-ndjson")


@router.post("/v1/cubes/{cube_id}/merge")
async def merge_cube(request: Request, cube_id: CubeId) -> JSONResponse:
    body = await read_body(request, MergeIn)
    copied = await run(service(request).merge_cubes, tenant(request), body.source, cube_id)
    return JSONResponse({"id": cube_id, "object": "cube.merge", "source": body.source,
                         "copied": copied})

