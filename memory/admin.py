"""The memory API's side of memory: create, read, change and search memories, and
manage cubes (create, list, delete, export, import, merge). Writes apply at once,
through the same :class:`memory.apply.Writer` as write-back. Blocking: callers run it
off the event loop.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from memory.apply import Writer, clean_context
from memory.blocks import BlockCache
from memory.errors import InvalidMemoryRequest, MemoryNotFound
from memory.models import (
    Cube,
    MemoryItem,
    MemoryStatus,
    MemoryType,
    Source,
    default_cube_id,
    normalise,
    now,
    stable_id,
)
from memory.redact import redact
from memory.retrieval import Retriever
from memory.store.base import Hit, MemoryStore, Scope


def check_cubes(store: MemoryStore, tenant: str, cube_ids: Iterable[str], *, param: str) -> None:
    for cube_id in cube_ids:
        if store.get_cube(tenant, cube_id) is None:
            raise MemoryNotFound(f"No cube '{cube_id}'.", param=param)


class MemoryAdmin:
    def __init__(self, store: MemoryStore, writer: Writer, retriever: Retriever,
                 blocks: BlockCache) -> None:
        self.store = store
        self.writer = writer
        self.retriever = retriever
        self.blocks = blocks

    # -- memories -----------------------------------------------------------------------

    def create(self, tenant: str, user: str, text: str, *, cube_id: str | None = None,
               context: str | None = None, type: MemoryType = "fact", tags: Sequence[str] = (),
               pinned: bool = False, created_at: int | None = None, sources: Sequence[Source] = (),
               memory_id: str | None = None) -> MemoryItem:
        return self.create_many(tenant, [{
            "user": user, "text": text, "cube_id": cube_id, "context": context, "type": type,
            "tags": list(tags), "pinned": pinned, "created_at": created_at, "sources": list(sources),
            "id": memory_id}])[0]

    def create_many(self, tenant: str, items: Sequence[dict[str, Any]]) -> list[MemoryItem]:
        """Memories written at once (one embedding batch). A spec holds ``user``, ``text``
        and optionally ``cube_id`` (default: the user's cube), ``context``, ``type``,
        ``tags``, ``pinned``, ``created_at``, ``sources`` and ``id``."""
        made: list[MemoryItem] = []
        stamp = now()
        checked: set[str] = set()
        for spec in items:
            user = spec["user"]
            cube = spec.get("cube_id") or default_cube_id(tenant, user)
            if cube not in checked:
                self.writer.ensure_default_cube(tenant, user, cube)
                check_cubes(self.store, tenant, [cube], param="cube_id")
                checked.add(cube)
            clean = redact(spec["text"]).strip()
            if not clean:
                raise InvalidMemoryRequest("text must not be empty.", param="text")
            made.append(MemoryItem(
                id=spec.get("id") or str(uuid.uuid4()), tenant=tenant, cube_id=cube, user=user,
                text=clean, context=clean_context(spec.get("context")),
                type=spec.get("type") or "fact", tags=list(spec.get("tags") or []),
                pinned=bool(spec.get("pinned")), created_at=spec.get("created_at") or stamp,
                updated_at=stamp, sources=list(spec.get("sources") or []), extractor="api"))
        self.writer.write(made)
        return made

    def get(self, tenant: str, memory_id: str) -> MemoryItem:
        item = self.store.get(tenant, memory_id)
        if item is None:
            raise MemoryNotFound(f"No memory '{memory_id}'.")
        return item

    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        """A page of current versions and the next page's cursor (ValueError: a bad one)."""
        return self.store.list_items(tenant, user=user, cube_id=cube_id, status=status,
                                     limit=limit, cursor=cursor)

    def patch(self, tenant: str, memory_id: str, changes: dict[str, Any]) -> MemoryItem:
        current = self.get(tenant, memory_id)
        allowed = {"text", "type", "tags", "pinned", "status"}
        update = {k: v for k, v in changes.items() if k in allowed and v is not None}
        if "text" in update:
            update["text"] = redact(update["text"]).strip()
            if not update["text"]:
                raise InvalidMemoryRequest("text must not be empty.", param="text")
        item = current.model_copy(update={**update, "version": current.version + 1,
                                          "updated_at": now(), "extractor": "api"})
        self.writer.write([item])
        return item

    def delete(self, tenant: str, memory_id: str) -> MemoryItem:
        return self.patch(tenant, memory_id, {"status": "deleted"})

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        versions = self.store.history(tenant, memory_id)
        if not versions:
            raise MemoryNotFound(f"No memory '{memory_id}'.")
        return versions

    def search(self, tenant: str, query: str, *, user: str | None = None,
               cube_ids: Sequence[str] | None = None, top_k: int = 10,
               statuses: Sequence[MemoryStatus] = ("active",)) -> list[Hit]:
        if cube_ids:
            check_cubes(self.store, tenant, cube_ids, param="cubes")
        scope = Scope(tenant=tenant, cube_ids=list(cube_ids) if cube_ids else None, user=user,
                      statuses=tuple(statuses))
        return self.retriever.search(scope, query, top_k)

    def purge_user(self, tenant: str, user: str) -> int:
        removed = self.store.purge_user(tenant, user)
        self.blocks.tenant_changed(tenant)
        return removed

    # -- cubes --------------------------------------------------------------------------

    def create_cube(self, tenant: str, name: str, *, description: str = "",
                    cube_id: str | None = None) -> Cube:
        cube = Cube(id=cube_id or f"cube_{uuid.uuid4().hex}", tenant=tenant, name=name,
                    kind="shared", description=description)
        if self.store.get_cube(tenant, cube.id) is not None:
            raise InvalidMemoryRequest(f"Cube '{cube.id}' exists.", param="id")
        self.store.put_cube(cube)
        return cube

    def get_cube(self, tenant: str, cube_id: str) -> Cube:
        cube = self.store.get_cube(tenant, cube_id)
        if cube is None:
            raise MemoryNotFound(f"No cube '{cube_id}'.")
        return cube

    def cube_with_count(self, tenant: str, cube_id: str) -> tuple[Cube, int]:
        """A cube and how many current items it holds (any status)."""
        cube = self.get_cube(tenant, cube_id)
        return cube, self.store.count(tenant, cube_id=cube_id)

    def list_cubes(self, tenant: str) -> list[Cube]:
        return self.store.list_cubes(tenant)

    def delete_cube(self, tenant: str, cube_id: str) -> int:
        self.get_cube(tenant, cube_id)
        removed = self.store.delete_cube_items(tenant, cube_id)
        self.store.delete_cube(tenant, cube_id)
        self.blocks.changed(tenant, cube_id)
        return removed

    def _all(self, tenant: str, cube_id: str) -> list[MemoryItem]:
        items: list[MemoryItem] = []
        cursor: str | None = None
        while True:
            page, cursor = self.store.list_items(tenant, cube_id=cube_id, limit=500, cursor=cursor)
            items += page
            if cursor is None:
                return items

    def export_cube(self, tenant: str, cube_id: str) -> Iterable[str]:
        """JSONL: the cube first, then every version of every item."""
        cube = self.get_cube(tenant, cube_id)
        yield json.dumps({"object": "cube", **cube.model_dump(exclude={"tenant"})}) + "\n"
        for item in self._all(tenant, cube_id):
            for version in self.store.history(tenant, item.id):
                yield json.dumps({"object": "memory", **version.model_dump(exclude={"tenant"})}) + "\n"

    def import_cube(self, tenant: str, lines: Iterable[str],
                    new_id: str | None = None) -> tuple[Cube, int]:
        """Restore an export (``export_cube``'s JSONL). ``new_id``: import it as a copy
        under that id instead, each memory under a new id of its own (the same ids on
        every import of one export, so importing twice adds nothing)."""
        cube: Cube | None = None
        versions: list[MemoryItem] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind = record.pop("object")
                if kind == "cube":
                    cube = Cube(tenant=tenant, **record)
                elif kind == "memory":
                    versions.append(MemoryItem(tenant=tenant, **record))
                else:
                    raise ValueError(f"unknown object {kind!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidMemoryRequest(f"line {number}: {exc}") from None
        if cube is None:
            raise InvalidMemoryRequest("the export has no cube line.")
        if any(v.cube_id != cube.id for v in versions):
            raise InvalidMemoryRequest("every memory must belong to the exported cube.")
        if new_id is not None and new_id != cube.id:
            # A copy is nobody's own cube: shared, with what it was copied from said.
            cube = cube.model_copy(update={
                "id": new_id, "kind": "shared", "owner": None, "created_at": now(),
                "description": cube.description or f"A copy of cube '{cube.id}'."})
            for v in versions:
                v.id, v.cube_id = stable_id("copy", tenant, new_id, v.id), new_id
        self.store.put_cube(cube)
        # Oldest versions first, so each item's newest ends up current.
        versions.sort(key=lambda v: v.version)
        for v in versions:
            v.text = redact(v.text)
        self.writer.write(versions)
        return cube, len({v.id for v in versions})

    def merge_cubes(self, tenant: str, source_id: str, target_id: str) -> int:
        """Copy the source's active items into the target, skipping texts it has."""
        self.get_cube(tenant, source_id)
        self.get_cube(tenant, target_id)
        have = {normalise(i.text) for i in self._all(tenant, target_id) if i.status == "active"}
        copies: list[MemoryItem] = []
        stamp = now()
        for item in self._all(tenant, source_id):
            key = normalise(item.text)
            if item.status != "active" or key in have:
                continue
            have.add(key)
            copies.append(item.model_copy(update={
                "id": stable_id("merge", tenant, target_id, item.id), "cube_id": target_id,
                "version": 1, "updated_at": stamp, "extractor": "merge"}))
        self.writer.write(copies)
        return len(copies)
