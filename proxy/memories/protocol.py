"""Request bodies of the memory and cube API, validated strictly (unknown fields are
400s naming them), and the shape of its list answers."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from memory.models import MAX_TIME, MemoryStatus, MemoryType, Source
from memory.store.base import Hit
from proxy.protocol import MAX_CUBES, MAX_ID_LENGTH

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
Tag = Annotated[str, Field(max_length=MAX_ID_LENGTH)]


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


def sources(given: list[SourceIn]) -> list[Source]:
    return [Source(**{k: v for k, v in s.model_dump().items() if v is not None}) for s in given]


def listing(data: list[dict[str, Any]], next_after: str | None = None) -> dict[str, Any]:
    """OpenAI's list shape; a page's ``next_after`` is the cursor for ``?after=``."""
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": next_after is not None}
    if next_after is not None:
        body["next_after"] = next_after
    return body


def scored(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{**h.item.api(), "score": round(h.score, 6)} for h in hits]
