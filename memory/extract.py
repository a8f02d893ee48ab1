"""Extraction: what an exchange adds to memory, in MemOS's two modes.

``fast`` (the default with the embedded model) stores each new user turn as a raw
memory with provenance. ``fine`` asks an LLM for atomic facts as JSON, then, for each
fact and the similar memories already stored, whether to ADD, UPDATE, DELETE or do
NONE. A reply that is not the JSON asked for falls back to fast mode: nothing told
is ever dropped because a small model answered badly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

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


Complete = Callable[[list[dict[str, str]]], Awaitable[str]]
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


class FineExtractor:
    def __init__(self, complete: Complete, *, max_facts: int = 10) -> None:
        self.complete = complete
        self.max_facts = max_facts

    async def extract(self, exchange: Exchange, similar: Similar) -> list[Operation]:
        said = new_user_turns(exchange.messages)
        if not said:
            return []
        convo = "\n".join(f"user: {t}" for t in said)
        if exchange.reply:
            convo += f"\nassistant: {exchange.reply}"
        try:
            reply = await self.complete([{"role": "system", "content": FACTS_PROMPT},
                                         {"role": "user", "content": convo}])
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
            ops.append(await self._decide(text, kind, source, similar))
        return ops

    def _facts(self, reply: str) -> list[tuple[str, MemoryType]] | None:
        data = _json_object(reply)
        if data is None or not isinstance(data.get("facts"), list):
            return None
        out: list[tuple[str, MemoryType]] = []
        for fact in data["facts"]:
            if isinstance(fact, str) and fact.strip():
                out.append((fact.strip(), "fact"))
            elif isinstance(fact, dict) and isinstance(fact.get("text"), str) and fact["text"].strip():
                kind = fact.get("type")
                out.append((fact["text"].strip(), kind if kind in _TYPES else "fact"))
        return out

    async def _decide(self, text: str, kind: MemoryType, source: Source,
                      similar: Similar) -> Operation:
        add = Operation("ADD", text=text, type=kind, sources=[source], extractor="fine")
        existing = await similar(text)
        if not existing:
            return add
        listing = "\n".join(f'- id={m.id}: "{m.text}"' for m in existing)
        try:
            reply = await self.complete([
                {"role": "system", "content": DECIDE_PROMPT},
                {"role": "user", "content": f'New fact: "{text}"\nExisting memories:\n{listing}'},
            ])
        except Exception as exc:
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
