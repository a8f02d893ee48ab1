"""OpenAI protocol models of ``POST /v1/embeddings``, and parsing its body.

``input`` takes each of OpenAI's four forms: a string, a list of strings, a list of
token ids (one input), or a list of lists of token ids. The form is told by the value's
shape (:func:`proxy.protocol.text_or_tokens_form`), so an error names the element at
fault (``input.[2]``), not every form the value failed to be. Unknown fields are kept:
they pass through to upstreams.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from proxy.errors import InvalidRequestError
from proxy.protocol import (
    MAX_ID_LENGTH,
    MAX_INT32,
    TokenIds,
    parse_object,
    text_or_tokens_form,
    validate,
)

Text = Annotated[str, Field(min_length=1)]

_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"


EmbeddingInput = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Tag("texts"), Field(min_length=1)]
    | Annotated[TokenIds, Tag("tokens")]
    | Annotated[list[TokenIds], Tag("token_lists"), Field(min_length=1)],
    Discriminator(text_or_tokens_form, custom_error_type="invalid_input",
                  custom_error_message=f"Input should be {_FORMS}"),
]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = None  # None: float
    dimensions: int | None = Field(default=None, ge=1, le=MAX_INT32)
    user: str | None = Field(default=None, max_length=MAX_ID_LENGTH)

    def inputs(self) -> list[str] | list[list[int]]:
        """Every input, one per vector: texts, or token id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]  # one token id list is one input
        return value  # type: ignore[return-value]  # list[str] or list[list[int]]

    def input_param(self, index: int) -> str:
        """The ``param`` naming one input: ``input`` itself when it is a single one."""
        single = isinstance(self.input, str) or (bool(self.input) and isinstance(self.input[0], int))
        return "input" if single else f"input.[{index}]"


def parse_embeddings_request(raw: bytes, *, max_inputs: int) -> tuple[dict[str, Any], EmbeddingRequest]:
    """Parse and validate a body; return the raw dict (to relay as-is) and the model.
    More than ``max_inputs`` inputs is a 400 naming ``input``."""
    body = parse_object(raw)
    req = validate(EmbeddingRequest, body)
    count = len(req.inputs())
    if count > max_inputs:
        raise InvalidRequestError(
            f"Invalid value for 'input': {count} inputs; at most {max_inputs} may be embedded "
            "in one request.", param="input", code="invalid_value")
    return body, req


def encode_vector(vector: Sequence[float] | str, encoding_format: str | None) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or with ``base64`` its little-endian float32
    bytes in base64. A vector already in the other form is converted."""
    if encoding_format == "base64":
        if isinstance(vector, str):
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    if isinstance(vector, str):
        return np.frombuffer(base64.b64decode(vector), dtype="<f4").tolist()
    return list(vector)
