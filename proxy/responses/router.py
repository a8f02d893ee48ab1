"""The routes of the Responses API: ``POST /v1/responses`` (a plain Starlette route, as
chat's), and ``GET|DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``
over the stored responses, scoped by the caller's tenant (and ``X-Memcube-User`` when
sent): another tenant's id is a 404."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.routing import Route

from proxy import headers as h
from proxy.auth import json_post_route, principal_of, require_key
from proxy.context import AppContext, context
from proxy.errors import InvalidRequestError, NotFoundError
from proxy.responses.protocol import MAX_RESPONSE_ID
from proxy.responses.serving import ResponsesServing
from proxy.responses.store import ResponseStore, StoredResponse

router = APIRouter(dependencies=[Depends(require_key)])
ResponseId = Annotated[str, Path(max_length=MAX_RESPONSE_ID)]


def responses_route(context: AppContext) -> Route:
    return json_post_route("/v1/responses", ResponsesServing(context).handle)


def _store(request: Request) -> ResponseStore:
    store = context(request).responses
    if store is None:
        raise NotFoundError("Responses are not stored on this proxy "
                            "(responses.retention_days: 0).")
    return store


async def _find(request: Request, response_id: str) -> StoredResponse:
    found = await asyncio.to_thread(_store(request).get, principal_of(request).tenant,
                                    response_id, request.headers.get(h.USER))
    if found is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return found


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: ResponseId,
                       stream: bool = False) -> dict[str, Any]:
    if stream:
        raise InvalidRequestError("Streaming a stored response is not supported: it is "
                                  "complete; fetch it without `stream`.", param="stream")
    return (await _find(request, response_id)).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: ResponseId) -> dict[str, Any]:
    deleted = await asyncio.to_thread(_store(request).delete, principal_of(request).tenant,
                                      response_id, request.headers.get(h.USER))
    if not deleted:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    request: Request, response_id: ResponseId,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=MAX_RESPONSE_ID)] = None,
) -> dict[str, Any]:
    items = (await _find(request, response_id)).input_items
    if order == "desc":
        items = items[::-1]
    if after is not None:
        at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
        if at is None:
            raise InvalidRequestError(f"No input item '{after}' in this response.", param="after")
        items = items[at + 1:]
    page = items[:limit]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit}
