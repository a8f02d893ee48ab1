"""How every JSON body is read and validated, and the protocol's shared bounds and ids.

Every JSON body (chat and the memory, cube and adapter APIs) is read by
:func:`parse_json`: strict UTF-8, no ``NaN``/``Infinity``, and nesting bounded by
jiter's recursion limit (about 200 levels), so what parses can be walked, validated
and encoded again without a ``RecursionError``. Failures name what was wrong.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json
from starlette.requests import Request

from proxy.errors import InvalidRequestError, UnsupportedMediaError

B = TypeVar("B", bound=BaseModel)

#: Ids a request names (users, sessions, cubes): bounded, so a huge one is a 400, not
#: a stored key or a filter scanned against every point.
MAX_ID_LENGTH = 256
#: Most cubes one request may name (mounted, or searched).
MAX_CUBES = 64
#: A C int: larger token counts, seeds and the like overflow local backends.
MAX_INT32 = 2**31 - 1
_BOM = b"\xef\xbb\xbf"
#: A list of token ids (prompts and embedding inputs may be given so).
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT32)]], Field(min_length=1)]


def text_or_tokens_form(value: Any) -> str | None:
    """Which of the OpenAI forms of a text input ``value`` takes, from its shape: ``text``,
    ``texts``, ``tokens`` or ``token_lists`` (None: none), so that a pydantic
    discriminator names the element at fault (``input.[2]``), not every form the value
    failed to be."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    if not value or isinstance(value[0], str):
        return "texts"
    if isinstance(value[0], int):  # bools too: strict validation refuses them as ids
        return "tokens"
    if isinstance(value[0], list):
        return "token_lists"
    return "texts"  # the first element is at fault: say what it should be


def _param_from_loc(loc: tuple[int | str, ...], body: Any, *, missing: bool = False) -> str | None:
    """OpenAI writes a path into the body as ``messages.[0].content``.

    pydantic's locations also name union members (``content.str``); those steps are
    not in the body and are skipped. A missing key, the last step of a ``missing``
    error, is kept.
    """
    if body is None:  # a query or path parameter: nothing to walk
        return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc) or None
    parts: list[str] = []
    node = body
    for index, step in enumerate(loc):
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            parts.append(step)
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            parts.append(f"[{step}]")
            node = node[step]
        elif missing and index == len(loc) - 1:
            parts.append(str(step))
        elif not isinstance(step, str):
            break
    return ".".join(parts) or None


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, or a 400 that says why it is not."""
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise _json_error(raw, str(exc)) from None


def _json_error(raw: bytes, reason: str) -> InvalidRequestError:
    if not raw.strip():
        message = "The request body is empty: send a JSON object."
    elif "recursion limit" in reason:
        message = f"The request body is nested too deeply for JSON ({reason})."
    else:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = (f"The request body is not valid UTF-8: byte 0x{raw[exc.start]:02x} "
                       f"at position {exc.start}.")
        else:
            message = f"The request body is not valid JSON: {reason}."
    return InvalidRequestError(message, code="invalid_json")


def parse_object(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def check_json_content_type(content_type: str | None) -> None:
    """JSON bodies come as ``application/json`` (or ``+json``), or with no type at all;
    a form or text upload is refused before it is parsed as something it is not."""
    if not content_type:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/")
                                       and media.endswith("+json")):
        return
    raise UnsupportedMediaError(
        f"Unsupported Content-Type '{media[:100]}': send the body as application/json.")


async def read_object(request: Request) -> dict[str, Any]:
    """A route's JSON body, read like the chat body (same checks, same errors)."""
    check_json_content_type(request.headers.get("content-type"))
    return parse_object(await request.body())


def validate(model: type[B], body: dict[str, Any]) -> B:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc, body) from None


async def read_body(request: Request, model: type[B]) -> B:
    return validate(model, await read_object(request))


def invalid_from_validation(exc: ValidationError, body: Any) -> InvalidRequestError:
    return invalid_from_errors(exc.errors(), body)


def invalid_from_errors(errors: Sequence[Any], body: Any) -> InvalidRequestError:
    """pydantic's error details (``loc``, ``msg``, ``type``) as one 400 naming a param.
    Locations are within ``body`` (FastAPI's leading ``body``/``query`` step removed).

    The error that reaches deepest into the body wins: for ``content: ["hi"]`` that is
    ``content.[0]`` (not a dict), not ``content`` (not a string). The union members that
    failed on that param are named together ("a valid string or a valid list")."""
    if not errors:
        return InvalidRequestError("Invalid request.")
    if errors[0]["type"] == "json_invalid":  # FastAPI parsed a route's body and failed
        reason = errors[0].get("ctx", {}).get("error", "invalid JSON")
        return InvalidRequestError(f"The request body is not valid JSON: {reason} (at "
                                   f"character {errors[0]['loc'][-1]}).", code="invalid_json")
    located = [(_param(err, body), err) for err in errors]
    depth = max(_depth(param) for param, _ in located)
    param = next(param for param, _ in located if _depth(param) == depth)
    chosen = [err for p, err in located if p == param]
    if chosen[0]["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                                   code="invalid_value")
    reasons: list[str] = []
    for err in chosen:
        reason = str(err["msg"])
        if reasons:
            reason = reason.removeprefix("Input should be ")
        if reason not in reasons:
            reasons.append(reason)
    what = f"'{param}'" if param else "the request body"
    return InvalidRequestError(f"Invalid value for {what}: {' or '.join(reasons)}.",
                               param=param, code="invalid_value")


def _param(err: Any, body: Any) -> str | None:
    return _param_from_loc(tuple(err["loc"]), body, missing=err["type"] == "missing")


def _depth(param: str | None) -> int:
    return 0 if param is None else param.count(".") + 1


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
