"""OpenAI protocol models of ``POST /v1/chat/completions``, and parsing its body.

Request models accept unknown fields (they pass through to the upstream); the proxy
validates what it reads or what would otherwise fail obscurely downstream, and the
message rules OpenAI checks (:func:`check_messages`), so a request OpenAI would refuse
is a 400 naming the field here too, whichever backend serves it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field

from proxy.errors import InvalidRequestError
from proxy.protocol import (
    MAX_CUBES,
    MAX_ID_LENGTH,
    MAX_INT32,
    parse_object,
    validate,
)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str
    arguments: str


class CustomCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str
    input: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    id: str
    type: Literal["function", "custom"]
    function: FunctionCall | None = None
    custom: CustomCall | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class MemoryOptions(BaseModel):
    """The `memory` extension object: how this request reads and writes memory."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True
    #: Unset: as ``enabled`` (memory off writes nothing unless ``write: true`` is given).
    write: bool | None = None
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
    req = validate(ChatCompletionRequest, body)
    check_messages(req.messages, body["messages"])
    return body, req


def check_messages(messages: list[ChatMessage], raw: list[dict[str, Any]]) -> None:
    """OpenAI's rules for each role, past what the types say: 400s naming the field.
    ``raw``: the messages as sent (a key sent as null is not a missing key)."""
    for i, (message, sent) in enumerate(zip(messages, raw, strict=True)):
        at = f"messages.[{i}]"
        role = message.role
        if role == "assistant":
            if message.content is None and not message.tool_calls and "function_call" not in sent:
                raise InvalidRequestError(
                    f"Invalid value for '{at}': an assistant message needs 'content' or "
                    "'tool_calls'.", param=f"{at}.content", code="invalid_value")
            for j, call in enumerate(message.tool_calls or []):
                if getattr(call, call.type) is None:
                    _missing(f"{at}.tool_calls.[{j}].{call.type}")
            continue
        if role == "tool" and message.tool_call_id is None:
            _missing(f"{at}.tool_call_id", "tool_call_id" in sent)
        if role == "function" and message.name is None:
            _missing(f"{at}.name", "name" in sent)
        if message.content is None and role != "function":  # a function's may be null
            _missing(f"{at}.content", "content" in sent, f"a {role} message needs content")


def _missing(param: str, null: bool = False, why: str = "") -> NoReturn:
    if null:
        raise InvalidRequestError(f"Invalid value for '{param}': {why or 'it is required'}, "
                                  "not null.", param=param, code="invalid_value")
    raise InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                              code="invalid_value")
