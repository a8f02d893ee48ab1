"""OpenAI protocol models of ``POST /v1/chat/completions``, and parsing its body.

Request models accept unknown fields (they pass through to the upstream); the proxy
validates only what it reads or what would otherwise fail obscurely downstream.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.protocol import MAX_CUBES, MAX_ID_LENGTH, MAX_INT32, invalid_from_validation, parse_object


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
    cubes: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]] | None = Field(
        default=None, max_length=MAX_CUBES)
    write_cube: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    top_k: int | None = Field(default=None, ge=0, le=100)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_INT32)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    memory: MemoryOptions | None = None


def parse_chat_request(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """Parse and validate a body; return the raw dict (to forward as-is) and the model."""
    body = parse_object(raw)
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc, body) from None
    return body, req
