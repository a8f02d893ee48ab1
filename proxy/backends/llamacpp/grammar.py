"""OpenAI's ``response_format`` on the local model: JSON output forced by a grammar.

``json_object`` limits sampling to a JSON object (llama.cpp's JSON grammar);
``json_schema`` (and llama-cpp-python's ``json_object`` with a ``schema``) to the
schema, which llama-cpp-python converts to GBNF. The model can then only produce text
the grammar accepts, so even the 135M model answers with parseable JSON, unless
``max_tokens`` cuts it short (``finish_reason: length``, as OpenAI does).

A schema becomes a grammar before any work, and is refused with a 400 naming the
field when it cannot: the converter does not support it, or llama.cpp cannot parse
the result. llama.cpp parses grammars recursively, and one nested deep enough (the
converter nests a string of ``maxLength`` 20000 that deep) overflows the stack and
kills the process; so nesting and size are bounded before llama.cpp sees a grammar.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from proxy.errors import InvalidRequestError

#: Deepest bracket nesting a grammar may have: llama.cpp overflowed an 8 MB stack
#: between 12,000 and 20,000 (tests/test_fine_extraction.py), and refuses most
#: grammars past 2,000 on its own.
MAX_DEPTH = 1000
#: Longest grammar text handed to llama.cpp.
MAX_CHARS = 1_000_000
_TYPES = ("text", "json_object", "json_schema")


def for_request(llm: Any, body: dict[str, Any]) -> LlamaGrammar | None:
    """The grammar sampling must follow for ``body`` on ``llm`` (None: none); raises
    the request's 400s."""
    gbnf = response_grammar(body)
    if gbnf is None:
        return None
    check_parses(llm, gbnf)
    return LlamaGrammar.from_string(gbnf, verbose=False)


def response_grammar(body: dict[str, Any]) -> str | None:
    """The GBNF grammar the request's ``response_format`` asks for (None: free text);
    raises a 400 naming the field when the format is malformed or cannot be followed."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequestError("response_format must be an object.", param="response_format")
    kind = fmt.get("type", "text")
    if kind not in _TYPES:
        raise InvalidRequestError(
            f"Invalid value for response_format.type: {str(kind)[:100]!r}; expected one of "
            f"{', '.join(_TYPES)}.", param="response_format.type", code="invalid_value")
    if kind == "text":
        return None
    param = "response_format.schema"
    schema = fmt.get("schema")  # llama-cpp-python's json_object with a schema
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("Missing required parameter: 'response_format.json_schema'.",
                                      param="response_format.json_schema")
        param, schema = "response_format.json_schema.schema", spec.get("schema")
    if schema is None:
        return JSON_GBNF
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object.", param=param)
    return _gbnf(json.dumps(schema, sort_keys=True), param)


@functools.lru_cache(maxsize=64)
def _gbnf(schema: str, param: str) -> str:
    """The schema as GBNF, once per distinct schema (extraction sends the same one)."""
    try:
        text = json_schema_to_gbnf(schema)
    except Exception as exc:  # the converter raises what it meets: ValueError, KeyError...
        raise InvalidRequestError(
            f"The local model cannot follow this JSON schema: {type(exc).__name__}: "
            f"{str(exc)[:200]}", param=param) from None
    if len(text) > MAX_CHARS or nesting(text) > MAX_DEPTH:
        raise InvalidRequestError(
            "This JSON schema makes a grammar too large or too deeply nested for the local "
            "model (large maxLength, maxItems or nested patterns).", param=param)
    return text


def nesting(gbnf: str) -> int:
    """The deepest bracket nesting of a GBNF text, outside literals, classes, comments."""
    depth = deepest = 0
    at, n = 0, len(gbnf)
    while at < n:
        c = gbnf[at]
        if c in "\"[":  # a literal or a character class: skip it, escapes included
            close = '"' if c == '"' else "]"
            at += 1
            while at < n and gbnf[at] != close:
                at += 2 if gbnf[at] == "\\" else 1
        elif c == "#":
            while at < n and gbnf[at] != "\n":
                at += 1
        elif c in "({":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")}":
            depth -= 1
        at += 1
    return deepest


def check_parses(llm: Any, gbnf: str, param: str = "response_format") -> None:
    """Raise a 400 unless llama.cpp parses ``gbnf`` for ``llm``'s vocabulary (it logs
    why to stderr and returns no sampler when it cannot)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidRequestError(
            "The local model cannot build a grammar from this response_format (too complex "
            "for llama.cpp's grammar parser).", param=param)
    llama_cpp.llama_sampler_free(sampler)
