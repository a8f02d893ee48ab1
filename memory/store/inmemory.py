"""An in-memory store: the fake beside the interface, for unit tests.

It keeps the interface's semantics (tenant scoping, versions, current flag), with
brute-force cosine for dense search and a plain BM25 over current items for sparse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from memory.models import Cube, MemoryItem, MemoryStatus, text_key
from memory.store.base import Hit, MemoryStore, Scope, StoreMismatchError

_WORD = re.compile(r"\w+")



def _words(item: MemoryItem) -> dict[str, float]:
    """Term weights of an item: its text, and its context at half weight (as the
    Qdrant stores do, roughly)."""
    counts: dict[str, float] = {}
    for text, weight in ((item.text, 1.0), (item.context or "", 0.5)):
        for word in _WORD.findall(text.lower()):
            counts[word] = counts.get(word, 0.0) + weight
    return counts

class InMemoryStore(MemoryStore):
    def __init__(self, *, embedding_model: str, dim: int) -> None:
        self.embedding_model = embedding_model
        self.dim = dim
        self.multivector = True
        # Each point's vectors: its pieces', or its text's.
        self._points: dict[str, tuple[MemoryItem, list[list[float]]]] = {}
        self._current: dict[tuple[str, str], str] = {}  # (tenant, id) -> point id
        self._cubes: dict[tuple[str, str], Cube] = {}

    def check(self, embedding_model: str, dim: int) -> None:
        if (embedding_model, dim) != (self.embedding_model, self.dim):
            raise StoreMismatchError(
                f"store was built with {self.embedding_model} ({self.dim} dims), "
                f"not {embedding_model} ({dim} dims)")

    def upsert(self, items: Sequence[MemoryItem], vectors: Sequence[Sequence[float]],
               pieces: Sequence[Sequence[Sequence[float]]] | None = None) -> None:
        per_item = pieces if pieces is not None else [()] * len(items)
        for item, vector, item_pieces in zip(items, vectors, per_item, strict=True):
            every = [list(p) for p in item_pieces] or [list(vector)]
            if len(vector) != self.dim or any(len(v) != self.dim for v in every):
                raise StoreMismatchError(f"vector has {len(vector)} dims, store {self.dim}")
            self._points[item.point_id] = (item.model_copy(deep=True), every)
            self._current[(item.tenant, item.id)] = item.point_id

    def _currents(self, tenant: str) -> list[tuple[MemoryItem, list[list[float]]]]:
        return [self._points[p] for (t, _), p in self._current.items() if t == tenant]

    def get(self, tenant: str, memory_id: str) -> MemoryItem | None:
        point = self._current.get((tenant, memory_id))
        return self._points[point][0].model_copy(deep=True) if point else None

    def history(self, tenant: str, memory_id: str) -> list[MemoryItem]:
        found = [i for i, _ in self._points.values() if i.tenant == tenant and i.id == memory_id]
        return sorted(found, key=lambda i: i.version)

    def list_items(self, tenant: str, *, user: str | None = None, cube_id: str | None = None,
                   status: MemoryStatus | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[MemoryItem], str | None]:
        rows = sorted((i for i, _ in self._currents(tenant)
                       if (user is None or i.user == user)
                       and (cube_id is None or i.cube_id == cube_id)
                       and (status is None or i.status == status)), key=lambda i: i.id)
        if cursor:
            rows = [i for i in rows if i.id > cursor]
        page = rows[:limit]
        return page, (page[-1].id if len(rows) > limit else None)

    def block_candidates(self, tenant: str, cube_id: str, limit: int) -> list[MemoryItem]:
        active = [i for i, _ in self._currents(tenant) if i.cube_id == cube_id and i.status == "active"]
        pinned = [i for i in active if i.pinned][:limit]
        hot = sorted(active, key=lambda i: -i.access_count)[:limit]
        return list({i.id: i for i in [*pinned, *hot]}.values())

    def _visible(self, scope: Scope) -> list[tuple[MemoryItem, list[list[float]]]]:
        return [(i, v) for i, v in self._currents(scope.tenant)
                if (scope.cube_ids is None or i.cube_id in scope.cube_ids)
                and (scope.user is None or i.user == scope.user)
                and i.status in scope.statuses]

    def search_dense(self, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
        hits = [Hit(i, max(sum(a * b for a, b in zip(vector, v, strict=True)) for v in vs))
                for i, vs in self._visible(scope)]
        return sorted(hits, key=lambda h: h.score, reverse=True)[:limit]

    def search_sparse(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        docs = [(i, _words(i)) for i, _ in self._visible(scope)]
        if not docs:
            return []
        avg = sum(sum(c.values()) for _, c in docs) / len(docs)
        terms = set(_WORD.findall(text.lower()))
        hits = []
        for item, counts in docs:
            score = 0.0
            length = sum(counts.values())
            for term in terms:
                tf = counts.get(term, 0.0)
                if not tf:
                    continue
                df = sum(1 for _, c in docs if term in c)
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))
            if score > 0:
                hits.append(Hit(item, score))
        return sorted(hits, key=lambda h: h.score, reverse=True)[:limit]

    def existing_texts(self, tenant: str, cube_id: str, keys: Sequence[str]) -> set[str]:
        wanted = set(keys)
        return {k for item, _ in self._currents(tenant)
                if item.cube_id == cube_id and item.status == "active"
                and (k := text_key(item.text)) in wanted}

    def count(self, tenant: str, *, cube_id: str | None = None) -> int:
        return sum(1 for i, _ in self._currents(tenant) if cube_id is None or i.cube_id == cube_id)

    def touch(self, tenant: str, memory_ids: Sequence[str], at: int) -> None:
        for memory_id in memory_ids:
            point = self._current.get((tenant, memory_id))
            if point:
                item = self._points[point][0]
                item.access_count += 1
                item.last_accessed_at = at

    def _erase(self, tenant: str, keep: Callable[[MemoryItem], bool]) -> int:
        doomed = {i.id for i, _ in self._points.values() if i.tenant == tenant and not keep(i)}
        self._points = {p: v for p, v in self._points.items()
                        if not (v[0].tenant == tenant and v[0].id in doomed)}
        for memory_id in doomed:
            self._current.pop((tenant, memory_id), None)
        return len(doomed)

    def purge_user(self, tenant: str, user: str) -> int:
        return self._erase(tenant, lambda i: i.user != user)

    def delete_cube_items(self, tenant: str, cube_id: str) -> int:
        return self._erase(tenant, lambda i: i.cube_id != cube_id)

    def put_cube(self, cube: Cube) -> None:
        self._cubes[(cube.tenant, cube.id)] = cube.model_copy()

    def get_cube(self, tenant: str, cube_id: str) -> Cube | None:
        return self._cubes.get((tenant, cube_id))

    def list_cubes(self, tenant: str) -> list[Cube]:
        return sorted((c for (t, _), c in self._cubes.items() if t == tenant), key=lambda c: c.id)

    def delete_cube(self, tenant: str, cube_id: str) -> bool:
        return self._cubes.pop((tenant, cube_id), None) is not None
