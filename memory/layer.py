"""The seam between the request path and memory.

The proxy calls :meth:`MemoryLayer.recall` before the backend (retrieve and inject)
and :meth:`MemoryLayer.remember` once the reply is complete, before the response
ends (write-back to a durable outbox; extraction happens later, off the path).
A request is a :class:`Turn` (who asks); what it said and got back, an :class:`Exchange`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from memory.activation import Prefix

# What a request did without, named in the ``X-Memcube-Degraded`` response header.
#: Memories could not be read: the request was answered without them.
RECALL = "recall"
#: The exchange could not be recorded (the outbox refused it: a full disk); it will
#: not be remembered. On a stream this is known only at its end, so the header
#: carries the outbox's state when the stream began and the end says for certain.
WRITE_BACK = "write-back"
#: The exchange is recorded, but the store takes no writes now: it is written back
#: when the store returns.
WRITE_BACK_DELAYED = "write-back-delayed"


@dataclass(frozen=True, slots=True)
class Turn:
    """Who is asking: resolved from the key, headers and body before memory is touched."""

    request_id: str
    tenant: str
    user: str
    session_id: str | None
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    #: Whether the user's own cube is read and written. False for a request that named
    #: no user (``user`` is then a stand-in): it reads only the cubes it mounts and
    #: writes only to a ``write_cube`` it names.
    personal: bool = True


@dataclass(frozen=True, slots=True)
class Exchange:
    """One exchange as it is recorded for write-back: who asked (a :class:`Turn`'s
    fields), what was said, the reply, and when. Stored in the outbox as JSON."""

    request_id: str
    tenant: str
    user: str
    session_id: str | None
    model: str
    messages: list[dict[str, Any]]
    reply: str | None
    options: dict[str, Any]
    at: int

    @classmethod
    def of(cls, turn: Turn, messages: list[dict[str, Any]], reply: str | None, *,
           at: int) -> Exchange:
        return cls(request_id=turn.request_id, tenant=turn.tenant, user=turn.user,
                   session_id=turn.session_id, model=turn.model, messages=list(messages),
                   reply=reply, options=dict(turn.options), at=at)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Exchange:
        data = json.loads(text)
        # Fields added by a newer writer are ignored so a rollback can still drain the outbox.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(slots=True)
class Recall:
    """What the request sends on: the messages with memories injected, and their ids
    (retrieved and in activation blocks). ``prefix``: the activation blocks that form
    the first message, if any."""

    messages: list[dict[str, Any]]
    memory_ids: list[str] = field(default_factory=list)
    prefix: Prefix | None = None
    #: The block of retrieved memories injected (the ``<memories>`` message's text).
    block: str | None = None
    #: What memory cannot do for this request, as known before the backend runs.
    degraded: list[str] = field(default_factory=list)


class MemoryLayer(Protocol):
    async def recall(self, turn: Turn, messages: list[dict[str, Any]]) -> Recall:
        """Never fails because memory is unavailable: the messages come back as they
        are, with ``degraded`` saying so. Fails for the request's own errors (a
        mounted cube that does not exist)."""
        ...

    async def remember(
        self, turn: Turn, messages: list[dict[str, Any]], reply: str | None
    ) -> bool:
        """Record the exchange durably before the response ends. False when it should
        have been recorded and could not be (it was not accepted: say so)."""
        ...


class NullMemory:
    """No memory: messages pass unchanged and nothing is written."""

    async def recall(self, turn: Turn, messages: list[dict[str, Any]]) -> Recall:
        return Recall(messages=messages)

    async def remember(
        self, turn: Turn, messages: list[dict[str, Any]], reply: str | None
    ) -> bool:
        return True
