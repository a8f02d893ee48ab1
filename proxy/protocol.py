"""OpenAI protocol models for the chat endpoint.

Request models accept unknown fields (they pass through to the upstream); the proxy
validates only what it reads or what would otherwise fail obscurely downstream.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.errors import InvalidRequestError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class MemoryOptions(BaseModel):
    """The `memory` extension object: how this request reads and writes memory."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True
    write: bool = True
    cubes: list[str] | None = None
    write_cube: str | None = None
    top_k: int | None = Field(default=None, ge=0, le=100)
    max_tokens: int | None = Field(default=None, ge=0)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    memory: MemoryOptions | None = None


def _param_from_loc(loc: tuple[int | str, ...], body: Any) -> str | None:
    """OpenAI writes a path into the body as ``messages.[0].content``.

    pydantic's locations also name union members (``content.str``); only the
    steps that exist in the body (or the missing key itself) are kept.
    """
    if body is None:  # a query or path parameter: nothing to walk
        return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc) or None
    parts: list[str] = []
    node = body
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str):
            parts.append(step)
            node = node.get(step)
            if node is None:
                break
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            parts.append(f"[{step}]")
            node = node[step]
        else:
            break
    return ".".join(parts) or None


def parse_chat_request(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """Parse and validate a body; return the raw dict (to forward as-is) and the model."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc, body) from None
    return body, req


def invalid_from_validation(exc: ValidationError, body: Any) -> InvalidRequestError:
    return invalid_from_error(exc.errors()[0], body)


def invalid_from_error(err: Any, body: Any) -> InvalidRequestError:
    """One pydantic error detail (``loc``, ``msg``, ``type``) as a 400 naming its param."""
    loc = tuple(err["loc"])
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    param = _param_from_loc(loc, body)
    msg = err["msg"]
    if err["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {msg}."
    return InvalidRequestError(message, param=param, code="invalid_value")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
