"""What memory did for one request, kept briefly for whoever asks: ``X-Memcube-Debug``.

A request sent with ``X-Memcube-Debug: 1`` leaves a record: the memory block injected
(the exact ``<memories>`` text the model received), the activation prefix it started
with, the ids of both, the user, session, adapter and what memory could not do. Read
it with ``GET /v1/requests/{id}`` (the id is the ``X-Memcube-Request-Id`` header), with
the same tenant's key or an admin key, within ``TTL`` seconds. Records live in this
process's RAM only, at most ``CAPACITY`` of them: injected text is the users' memory,
so nothing is kept unless asked for, and nothing outlives a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Path, Request

from proxy.auth import principal_of, require_key
from proxy.errors import NotFoundError
from proxy.protocol import MAX_ID_LENGTH

#: The request header that asks for a record.
DEBUG = "x-memcube-debug"
TTL = 900.0
CAPACITY = 512

router = APIRouter(dependencies=[Depends(require_key)])


class Traces:
    """The recent records, oldest first; expired ones go as new ones come."""

    def __init__(self, *, ttl: float = TTL, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.capacity, self.clock = ttl, capacity, clock
        self._records: OrderedDict[str, tuple[float, str, dict[str, Any]]] = OrderedDict()

    def keep(self, tenant: str, record: dict[str, Any]) -> None:
        now = self.clock()
        self._records[record["id"]] = (now, tenant, record)
        self._records.move_to_end(record["id"])
        while self._records:
            at, _, _ = next(iter(self._records.values()))
            if len(self._records) <= self.capacity and now - at <= self.ttl:
                break
            self._records.popitem(last=False)

    def get(self, tenant: str | None, request_id: str) -> dict[str, Any] | None:
        """The record, if it is still kept and ``tenant`` may read it (None: any)."""
        found = self._records.get(request_id)
        if found is None or self.clock() - found[0] > self.ttl:
            return None
        return found[2] if tenant is None or found[1] == tenant else None


def wanted(request: Request) -> bool:
    return request.headers.get(DEBUG, "").strip().lower() in ("1", "true", "yes")


@router.get("/v1/requests/{request_id}")
async def get_request(request: Request,
                      request_id: str = Path(max_length=MAX_ID_LENGTH)) -> dict[str, Any]:
    principal = principal_of(request)
    # An admin reads any tenant's records; a tenant only its own.
    found = request.app.state.context.traces.get(None if principal.admin else principal.tenant,
                                        request_id)
    if found is None:
        raise NotFoundError(
            f"No record of request '{request_id}': records are kept only for requests sent "
            f"with 'X-Memcube-Debug: 1', for {int(TTL // 60)} minutes, by the proxy that "
            "served them.", code="request_not_found")
    return found
