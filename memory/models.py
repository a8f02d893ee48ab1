"""The plaintext memory data model: MemCubes and the memory items they hold.

A MemCube is a named container of memory items owned by a tenant: each user has a
default cube (created on first write), and tenants can create shared cubes that
requests mount. Items are versioned: an update writes a new version and keeps the
old ones; delete is a new version with status ``deleted`` (soft).
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MemoryType = Literal["fact", "preference", "event", "raw"]
MemoryStatus = Literal["active", "archived", "deleted"]
CubeKind = Literal["user", "shared"]

#: Bounds of the numbers an item carries. Imports and the API hand them in from outside;
#: beyond these they are no dates or counts, and overflow the stores' 64-bit integers.
MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_COUNT = 2**53 - 1  # exact as a JSON number everywhere
Time = Annotated[int, Field(ge=0, le=MAX_TIME)]

# Deterministic ids: the same input (an exchange replayed after a crash) gives the
# same id, so an upsert overwrites instead of duplicating.
ID_NAMESPACE = uuid.UUID("6f1d2b1e-5c6a-4f0e-9a57-1c3f7b2d9e40")


def stable_id(*parts: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))


def default_cube_id(tenant: str, user: str) -> str:
    return stable_id("cube", tenant, user)


def version_point_id(tenant: str, memory_id: str, version: int) -> str:
    """The store's point id of one version of one memory item. The tenant is part of it:
    item ids can come from outside (imports), and two tenants' items with one id must
    never overwrite each other's points."""
    return stable_id("version", tenant, memory_id, str(version))


def normalise(text: str) -> str:
    """The form two texts are compared in for duplicates: case and spacing ignored."""
    return re.sub(r"\s+", " ", text.casefold()).strip()


def text_key(text: str) -> str:
    """A short fixed-size key of the normalised text, indexed by the stores so a
    duplicate is found by one index lookup instead of a search."""
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:32]


def now() -> int:
    return int(time.time())


class Source(BaseModel):
    """Provenance: one message an item was drawn from."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = None
    session_id: str | None = None
    role: str = "user"
    at: Time = Field(default_factory=now)
    ref: str | None = Field(default=None, description="Caller's id for the message (e.g. a dia_id).")


class MemoryItem(BaseModel):
    """One version of one memory item, as stored."""

    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    cube_id: str
    user: str
    text: str
    context: str | None = Field(default=None, description=(
        "What the memory was said in reply to (e.g. the assistant message before a user "
        "turn): searched with a lower weight, never injected, so a bare \"Yes, every "
        "Sunday\" is found by the question it answers."))
    type: MemoryType = "raw"
    tags: list[str] = Field(default_factory=list)
    pinned: bool = False
    status: MemoryStatus = "active"
    version: int = Field(default=1, ge=1, le=MAX_COUNT)
    created_at: Time = Field(default_factory=now)
    updated_at: Time = Field(default_factory=now)
    access_count: int = Field(default=0, ge=0, le=MAX_COUNT)
    last_accessed_at: Time | None = None
    sources: list[Source] = Field(default_factory=list)
    extractor: str | None = Field(default=None, description="What produced it: fast, fine, api, import.")

    @property
    def point_id(self) -> str:
        return version_point_id(self.tenant, self.id, self.version)

    def api(self) -> dict[str, Any]:
        """The contract's shape (tenant and internals left out)."""
        return {
            "id": self.id, "object": "memory", "cube_id": self.cube_id, "user": self.user,
            "text": self.text, "context": self.context, "type": self.type, "tags": list(self.tags),
            "pinned": self.pinned,
            "status": self.status, "version": self.version, "created_at": self.created_at,
            "updated_at": self.updated_at, "access_count": self.access_count,
            "last_accessed_at": self.last_accessed_at, "extractor": self.extractor,
            "sources": [s.model_dump() for s in self.sources],
        }


class Cube(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    name: str
    kind: CubeKind = "user"
    owner: str | None = Field(default=None, description="The user of a default cube.")
    description: str = ""
    created_at: Time = Field(default_factory=now)

    def api(self) -> dict[str, Any]:
        return {"id": self.id, "object": "cube", "name": self.name, "kind": self.kind,
                "owner": self.owner, "description": self.description,
                "created_at": self.created_at}
