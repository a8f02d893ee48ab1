"""OpenAI protocol models of ``POST /v1/responses``, and parsing its body.

The request is validated as OpenAI validates it, so a client's mistake is a 400 naming
the field (``input[2].call_id``), not an upstream's puzzle. Unknown top-level fields are
kept (a native Responses upstream may know them); fields the proxy cannot honour on a
translated request are refused where they are read (:mod:`proxy.responses.translate`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from proxy.chat.protocol import MemoryOptions
from proxy.errors import InvalidRequestError
from proxy.protocol import (
    MAX_ID_LENGTH,
    MAX_INT32,
    invalid_from_errors,
    parse_object,
    validate,
)

#: Longest response id accepted (``resp_`` and 32 hex digits, or an upstream's own).
MAX_RESPONSE_ID = 128


class _Item(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class InputText(_Item):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(_Item):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class InputFile(_Item):
    type: Literal["input_file"]


class Refusal(_Item):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | InputImage | InputFile | Refusal, Field(discriminator="type")]


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Part]
    id: str | None = None


class ReasoningItem(_Item):
    """Sent back by clients of reasoning models; nothing for a chat model to read."""

    type: Literal["reasoning"]


class ItemReference(_Item):
    type: Literal["item_reference"]
    id: str


def _item_type(item: Any) -> str | None:
    """An item's type; a message may leave it out (OpenAI's "easy" input message)."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")] | Annotated[ItemReference, Tag("item_reference")],
    Discriminator(_item_type),
]


class FunctionTool(_Item):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Item):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Item):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(_Item):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    model: str = Field(min_length=1)
    input: str | list[InputItem] = ""
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16)
    user: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    store: bool = True
    previous_response_id: str | None = Field(default=None, min_length=1,
                                             max_length=MAX_RESPONSE_ID)
    memory: MemoryOptions | None = None


def parse_responses_request(raw: bytes) -> tuple[dict[str, Any], ResponsesRequest]:
    """Parse and validate a body; return the raw dict (for a native upstream) and the model."""
    body = parse_object(raw)
    req = validate(ResponsesRequest, body)
    if not req.input and not req.previous_response_id:
        raise InvalidRequestError("Missing required parameter: 'input'.", param="input",
                                  code="invalid_value")
    return body, req


def function_tools(req: ResponsesRequest) -> list[FunctionTool]:
    """The request's tools, each a function tool, or a 400 naming the one that is not."""
    tools: list[FunctionTool] = []
    for index, tool in enumerate(req.tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequestError(
                f"Tool type '{str(kind)[:64]}' is not supported by this proxy: only function "
                "tools are.", param=f"tools.[{index}].type", code="unsupported_tool")
        try:
            tools.append(FunctionTool.model_validate(tool))
        except ValidationError as exc:
            errors = [{**e, "loc": ("tools", index, *e["loc"])} for e in exc.errors()]
            raise invalid_from_errors(errors, {"tools": req.tools}) from None
    return tools
