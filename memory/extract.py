"""Extraction: what an exchange adds to memory, in MemOS's two modes.

``fast`` (the default with the embedded model) stores each new user turn as a raw
memory with provenance. ``fine`` asks an LLM for atomic facts as JSON, then, for each
fact and the similar memories already stored, whether to ADD, UPDATE, DELETE or do
NONE. A reply that is not the JSON asked for falls back to fast mode: nothing told
is ever dropped because a small model answered badly.

Each call asks for its JSON schema as OpenAI's ``response_format`` (the local model
samples under a grammar that follows it), is bounded in tokens (``max_tokens``) and in
time (``timeout`` seconds, waiting for the model included), and is marked as
background work for the backend. A call past its time is cancelled, which stops the
generation, and counts as a failed call: the turn falls back to fast mode. A facts
reply cut short by ``max_tokens`` keeps the facts it completed (each fact once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from memory.layer import Exchange
from memory.models import MemoryItem, MemoryType, Source

log = logging.getLogger(__name__)

OpKind = Literal["ADD", "UPDATE", "DELETE", "NONE"]
_TYPES = ("fact", "preference", "event", "raw")


@dataclass(slots=True)
class Operation:
    kind: OpKind
    text: str = ""
    type: MemoryType = "raw"
    target: str | None = None  # the id an UPDATE or DELETE acts on
    context: str | None = None  # what the text answered (see MemoryItem.context)
    sources: list[Source] = field(default_factory=list)
    extractor: str = "fast"


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and p.get("type") == "text")
    return ""


def new_user_turns(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The trailing user messages: the turn this exchange added (the client sends the
    earlier history again with every call; it was stored when it was new)."""
    out: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "user":
            break
        text = message_text(message).strip()
        if text:
            out.append(text)
    return out[::-1]


#: Longest context kept with a fast memory: enough for the question a turn answers.
CONTEXT_CHARS = 1000


def reply_context(messages: Sequence[dict[str, Any]]) -> str | None:
    """The last assistant message before the trailing user turns: what they answer."""
    at = len(messages)
    while at > 0 and messages[at - 1].get("role") == "user":
        at -= 1
    for message in reversed(messages[:at]):
        if message.get("role") == "assistant":
            text = message_text(message).strip()
            return text[-CONTEXT_CHARS:] or None
        if message.get("role") not in ("tool", "function"):
            return None
    return None


def fast(exchange: Exchange) -> list[Operation]:
    source = Source(request_id=exchange.request_id, session_id=exchange.session_id, role="user",
                    at=exchange.at)
    context = reply_context(exchange.messages)
    return [Operation("ADD", text=t, type="raw", context=context, sources=[source],
                      extractor="fast")
            for t in new_user_turns(exchange.messages)]


class Complete(Protocol):
    """One LLM call: the reply's text for ``messages``, in JSON following
    ``response_format`` (OpenAI's field), at most ``max_tokens`` long, run for
    ``tenant`` as background work."""

    def __call__(self, messages: list[dict[str, str]], *, response_format: dict[str, Any],
                 max_tokens: int, tenant: str) -> Awaitable[str]: ...


Similar = Callable[[str], Awaitable[list[MemoryItem]]]

FACTS_PROMPT = (
    "You extract durable memories about the user from a conversation turn. Return ONLY a "
    'JSON object {"facts": [{"text": "...", "type": "fact|preference|event"}]} with short, '
    "self-contained statements in the third person (\"The user ...\"). Include dates when "
    'said. Return {"facts": []} if nothing is worth remembering.'
)
DECIDE_PROMPT = (
    "You maintain a memory store. For the new fact and the existing memories below, decide "
    'one action and return ONLY JSON {"event": "ADD|UPDATE|DELETE|NONE", "id": "<existing '
    'id or null>", "text": "<final text>"}. ADD: new information. UPDATE: it refines or '
    "changes an existing memory (give its id and the merged text). DELETE: it contradicts "
    "an existing memory that is now false (give its id). NONE: already known."
)


#: Longest fact asked for, in characters: a small model that repeats itself inside a
#: string is made to close it, so its fact completes within ``max_tokens``.
FACT_CHARS = 200


def facts_format(max_facts: int) -> dict[str, Any]:
    """The response_format of the facts call: at most ``max_facts`` typed facts."""
    fact = {"type": "object", "additionalProperties": False, "required": ["text", "type"],
            "properties": {"text": {"type": "string", "maxLength": FACT_CHARS},
                           "type": {"type": "string", "enum": list(_TYPES[:3])}}}
    return {"type": "json_schema", "json_schema": {"name": "memory_facts", "schema": {
        "type": "object", "additionalProperties": False, "required": ["facts"],
        "properties": {"facts": {"type": "array", "items": fact, "maxItems": max_facts}}}}}


def decision_format(ids: Sequence[str]) -> dict[str, Any]:
    """The response_format of a decision: the event, and the id of one of ``ids``."""
    return {"type": "json_schema", "json_schema": {"name": "memory_decision", "schema": {
        "type": "object", "additionalProperties": False, "required": ["event", "id", "text"],
        "properties": {"event": {"type": "string", "enum": ["ADD", "UPDATE", "DELETE", "NONE"]},
                       "id": {"type": ["string", "null"], "enum": [*ids, None]},
                       "text": {"type": "string"}}}}}


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in a reply (models wrap JSON in prose or code fences)."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _cut_short(text: str) -> dict[str, Any] | None:
    """A facts reply cut off by max_tokens (a small model may repeat one fact until
    then): the object up to its last complete fact, closed."""
    start = text.find("{")
    if start < 0:
        return None
    for end in reversed([m.end() for m in re.finditer(r"\}", text)]):
        try:
            value = json.loads(text[start:end] + "]}")
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


class FineExtractor:
    """``max_tokens`` and ``timeout`` (seconds) bound each call to the LLM."""

    def __init__(self, complete: Complete, *, max_facts: int = 5, max_tokens: int = 256,
                 timeout: float = 60.0) -> None:
        self.complete = complete
        self.max_facts = max_facts
        self.max_tokens = max_tokens
        self.timeout = timeout

    async def _ask(self, messages: list[dict[str, str]], response_format: dict[str, Any],
                   tenant: str) -> str:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
        # cancellation that arrives as the wait ends (a shutdown would then wait).
        async with asyncio.timeout(self.timeout):
            return await self.complete(messages, response_format=response_format,
                                       max_tokens=self.max_tokens, tenant=tenant)

    async def extract(self, exchange: Exchange, similar: Similar) -> list[Operation]:
        said = new_user_turns(exchange.messages)
        if not said:
            return []
        convo = "\n".join(f"user: {t}" for t in said)
        if exchange.reply:
            convo += f"\nassistant: {exchange.reply}"
        try:
            reply = await self._ask([{"role": "system", "content": FACTS_PROMPT},
                                     {"role": "user", "content": convo}],
                                    facts_format(self.max_facts), exchange.tenant)
        except TimeoutError:
            log.warning("fine extraction took over %ss and was stopped; storing the turn as "
                        "raw", self.timeout)
            return fast(exchange)
        except Exception as exc:  # the LLM is optional; the turn is not
            log.warning("fine extraction failed (%s); storing the turn as raw", type(exc).__name__)
            return fast(exchange)
        facts = self._facts(reply)
        if facts is None:
            log.info("fine extraction returned no valid JSON; storing the turn as raw")
            return fast(exchange)
        source = Source(request_id=exchange.request_id, session_id=exchange.session_id, role="user",
                        at=exchange.at)
        ops: list[Operation] = []
        for text, kind in facts[: self.max_facts]:
            ops.append(await self._decide(text, kind, source, similar, exchange.tenant))
        return ops

    def _facts(self, reply: str) -> list[tuple[str, MemoryType]] | None:
        """The facts of a reply, each once; None: not the JSON asked for."""
        data = _json_object(reply) or _cut_short(reply)
        if data is None or not isinstance(data.get("facts"), list):
            return None
        out: list[tuple[str, MemoryType]] = []
        seen: set[str] = set()
        for fact in data["facts"]:
            item: dict[str, Any] = fact if isinstance(fact, dict) else {"text": fact}
            text, kind = item.get("text"), item.get("type")
            if not isinstance(text, str) or not text.strip() or text.strip().casefold() in seen:
                continue
            seen.add(text.strip().casefold())
            out.append((text.strip(), kind if kind in _TYPES else "fact"))
        return out

    async def _decide(self, text: str, kind: MemoryType, source: Source,
                      similar: Similar, tenant: str) -> Operation:
        add = Operation("ADD", text=text, type=kind, sources=[source], extractor="fine")
        existing = await similar(text)
        if not existing:
            return add
        listing = "\n".join(f'- id={m.id}: "{m.text}"' for m in existing)
        try:
            reply = await self._ask([
                {"role": "system", "content": DECIDE_PROMPT},
                {"role": "user", "content": f'New fact: "{text}"\nExisting memories:\n{listing}'},
            ], decision_format([m.id for m in existing]), tenant)
        except Exception as exc:  # a timeout too
            log.warning("fine decision failed (%s); adding the fact", type(exc).__name__)
            return add
        data = _json_object(reply) or {}
        event = str(data.get("event", "")).upper()
        known = {m.id for m in existing}
        target = data.get("id") if data.get("id") in known else None
        final = data.get("text") if isinstance(data.get("text"), str) and data["text"].strip() else text
        if event == "NONE":
            return Operation("NONE", text=text, target=target, extractor="fine")
        if event in ("UPDATE", "DELETE") and target is not None:
            return Operation(event, text=final, type=kind, target=target,  # type: ignore[arg-type]
                             sources=[source], extractor="fine")
        return add
