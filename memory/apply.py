"""Writing memories: the one path by which versions reach the store, and write-back
plans (what extraction decided for an exchange) applied through it.

Every write is redacted, deduplicated against its cube and versioned: an update is a
new version, a delete a new version marked deleted. Writes are idempotent: a plan
replayed after a crash writes the same ids and versions, and skips what it applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memory.blocks import BlockCache
from memory.embedding.base import Embedder
from memory.extract import Operation
from memory.models import Cube, MemoryItem, default_cube_id, now, stable_id, text_key
from memory.pieces import embed_with_pieces
from memory.redact import redact
from memory.store.base import MemoryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one exchange writes: its operations, into one cube, for one user."""

    tenant: str
    user: str
    cube_id: str
    request_id: str
    operations: Sequence[Operation]


def clean_context(context: str | None) -> str | None:
    """Context is written like text: redacted, and dropped when nothing is left."""
    return (redact(context).strip() or None) if context else None


class Writer:
    def __init__(self, store: MemoryStore, embedder: Embedder, blocks: BlockCache) -> None:
        self.store = store
        self.embedder = embedder
        self.blocks = blocks

    def write(self, items: Sequence[MemoryItem]) -> None:
        """Embed and upsert these versions (one embedding batch), then tell the blocks."""
        if not items:
            return
        texts = [i.text for i in items]
        if self.store.multivector:  # one embedding batch for texts and their pieces
            vectors, pieces = embed_with_pieces(self.embedder, texts)
            self.store.upsert(items, vectors, pieces)
        else:
            self.store.upsert(items, self.embedder.embed(texts))
        self.blocks.written(items)

    def ensure_default_cube(self, tenant: str, user: str, cube_id: str) -> None:
        if cube_id == default_cube_id(tenant, user) and self.store.get_cube(tenant, cube_id) is None:
            self.store.put_cube(Cube(id=cube_id, tenant=tenant, name=f"{user} (default)",
                                     kind="user", owner=user))

    def cube_ready(self, tenant: str, user: str, cube_id: str) -> bool:
        """The write cube exists (a user's default cube is made). A chat names its write
        cube before the store may be asked (it was down), or the cube may be deleted
        since: an exchange never writes into a cube that is not there."""
        if cube_id == default_cube_id(tenant, user):
            self.ensure_default_cube(tenant, user, cube_id)
            return True
        return self.store.get_cube(tenant, cube_id) is not None

    # -- plans --------------------------------------------------------------------------

    def apply(self, plans: Sequence[Plan]) -> list[MemoryItem]:
        """Write what these plans decided, in one batch; the versions written."""
        writes: list[MemoryItem] = []
        # Redacted once: the duplicate check and the write both read these.
        texts = [[redact(op.text).strip() for op in plan.operations] for plan in plans]
        # (tenant, cube, text key): in the store already, or written earlier in this batch
        written = self._stored_texts(plans, texts)
        cubes_seen: dict[tuple[str, str], bool] = {}
        stamp = now()
        for plan, cleaned in zip(plans, texts, strict=True):
            tenant, cube_id = plan.tenant, plan.cube_id
            if (tenant, cube_id) not in cubes_seen:
                cubes_seen[(tenant, cube_id)] = self.cube_ready(tenant, plan.user, cube_id)
            if not cubes_seen[(tenant, cube_id)]:
                log.warning("write-back of request %s skipped: its cube is gone", plan.request_id)
                continue
            for index, (op, text) in enumerate(zip(plan.operations, cleaned, strict=True)):
                if op.kind == "ADD":
                    key = (tenant, cube_id, text_key(text))
                    if not text or key in written:
                        continue
                    written.add(key)
                    writes.append(MemoryItem(
                        id=stable_id("memory", tenant, cube_id, plan.request_id, str(index)),
                        tenant=tenant, cube_id=cube_id, user=plan.user, text=text, type=op.type,
                        context=clean_context(op.context),
                        created_at=min((s.at for s in op.sources), default=stamp),
                        updated_at=stamp, sources=op.sources, extractor=op.extractor))
                elif op.kind in ("UPDATE", "DELETE") and op.target:
                    changed = self._changed(plan, op, text, stamp)
                    if changed is not None:
                        writes.append(changed)
        self.write(writes)
        return writes

    def _changed(self, plan: Plan, op: Operation, text: str, stamp: int) -> MemoryItem | None:
        assert op.target is not None
        current = self.store.get(plan.tenant, op.target)
        if current is None or any(s.request_id == plan.request_id for s in current.sources):
            return None  # gone, or this exchange already applied it (a replay)
        changes: dict[str, Any] = {
            "version": current.version + 1, "updated_at": stamp,
            "sources": [*current.sources, *op.sources], "extractor": op.extractor}
        if op.kind == "UPDATE" and text:
            changes["text"] = text
        else:
            changes["status"] = "deleted"
        return current.model_copy(update=changes)

    def _stored_texts(self, plans: Sequence[Plan],
                      texts: Sequence[Sequence[str]]) -> set[tuple[str, str, str]]:
        """(tenant, cube, text key) of every ADD in the batch that its cube already holds:
        one index lookup per cube, not a search per memory. ``texts``: each plan's
        operation texts, already redacted."""
        wanted: dict[tuple[str, str], set[str]] = {}
        for plan, cleaned in zip(plans, texts, strict=True):
            keys = wanted.setdefault((plan.tenant, plan.cube_id), set())
            keys.update(text_key(t) for op, t in zip(plan.operations, cleaned, strict=True)
                        if op.kind == "ADD" and t)
        return {(tenant, cube_id, key) for (tenant, cube_id), keys in wanted.items() if keys
                for key in self.store.existing_texts(tenant, cube_id, sorted(keys))}
