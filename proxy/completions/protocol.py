"""OpenAI protocol models of ``POST /v1/completions``, and parsing its body.

As on chat, the request model accepts unknown fields (they pass through to the
upstream) and validates what the proxy reads or what would fail obscurely downstream.
``prompt`` takes every form OpenAI takes: a string, a list of strings, a list of token
ids, or a list of lists of token ids.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from proxy.chat.protocol import MemoryOptions, StreamOptions
from proxy.errors import InvalidRequestError
from proxy.protocol import (
    MAX_ID_LENGTH,
    MAX_INT32,
    TokenIds,
    parse_object,
    text_or_tokens_form,
    validate,
)

#: Most prompts one request may carry (OpenAI's own limit on a batch of inputs).
MAX_PROMPTS = 2048



Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts"), Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[TokenIds, Tag("tokens")]
    | Annotated[list[TokenIds], Tag("token_lists"), Field(min_length=1, max_length=MAX_PROMPTS)],
    Discriminator(text_or_tokens_form, custom_error_type="invalid_prompt", custom_error_message=(
        "Input should be a valid string or a valid list (of strings, of token ids, or of "
        "lists of token ids)")),
]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    prompt: Prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    memory: MemoryOptions | None = None

    def texts(self) -> list[str] | None:
        """The prompts as text, one a choice; None when they are token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, str) for p in self.prompt):
            return [p for p in self.prompt if isinstance(p, str)]
        return None


def parse_completion_request(raw: bytes) -> tuple[dict[str, Any], CompletionRequest]:
    """Parse and validate a body; return the raw dict (to forward as-is) and the model."""
    body = parse_object(raw)
    req = validate(CompletionRequest, body)
    if req.best_of is not None and req.best_of < (req.n or 1):
        raise InvalidRequestError("best_of must be greater than or equal to n.", param="best_of")
    if req.memory is not None and req.texts() is None:
        raise InvalidRequestError(
            "Memory needs the prompt as text (a string or a list of strings), not token ids.",
            param="prompt")
    return body, req
