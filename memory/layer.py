"""The seam between the request path and memory.

The proxy calls :meth:`MemoryLayer.recall` before the backend (retrieve and inject)
and :meth:`MemoryLayer.remember` once the reply is complete, before the response
ends (write-back to a durable outbox; extraction happens later, off the path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from memory.activation import Prefix


@dataclass(frozen=True, slots=True)
class Turn:
    """Who is asking: resolved from the key, headers and body before memory is touched."""

    request_id: str
    tenant: str
    user: str
    session_id: str | None
    model: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Recall:
    """What the request sends on: the messages with memories injected, and their ids
    (retrieved and in activation blocks). ``prefix``: the activation blocks that form
    the first message, if any."""

    messages: list[dict[str, Any]]
    memory_ids: list[str] = field(default_factory=list)
    prefix: Prefix | None = None


class MemoryLayer(Protocol):
    async def recall(self, turn: Turn, messages: list[dict[str, Any]]) -> Recall: ...

    async def remember(
        self, turn: Turn, messages: list[dict[str, Any]], reply: str | None
    ) -> None: ...


class NullMemory:
    """No memory: messages pass unchanged and nothing is written."""

    async def recall(self, turn: Turn, messages: list[dict[str, Any]]) -> Recall:
        return Recall(messages=messages)

    async def remember(
        self, turn: Turn, messages: list[dict[str, Any]], reply: str | None
    ) -> None:
        return None
