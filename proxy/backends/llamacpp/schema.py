"""The OpenAI schema at the local model's edge: what of a chat request it honours or
refuses, and the chat.completion and chat.completion.chunk objects it answers with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.errors import InvalidRequestError
from proxy.protocol import completion_id, now

# Sampling fields of the OpenAI schema (and llama.cpp server's extras) the local model honours.
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
             "presence_penalty", "frequency_penalty")

#: Builds one chunk of a stream: (delta, finish reason) -> chat.completion.chunk.
ChunkFn = Callable[[dict[str, Any], str | None], dict[str, Any]]


def check_request(body: dict[str, Any]) -> None:
    """Refuse what the local model cannot do (400s, before any work)."""
    if (body.get("n") or 1) != 1:
        raise InvalidRequestError("The local model supports only n=1.", param="n")
    for unsupported in ("tools", "functions", "logprobs"):
        if body.get(unsupported):
            raise InvalidRequestError(
                f"'{unsupported}' is not supported by the local model.", param=unsupported
            )
    # response_format is followed by a grammar (see .grammar), and checked there.


def plain_message(message: dict[str, Any], index: int) -> dict[str, str]:
    """The chat template takes text; flatten content parts, refuse what it cannot show."""
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    "The local model accepts only text content parts.",
                    param=f"messages.[{index}].content",
                )
            parts.append(part["text"])
        content = "".join(parts)
    return {"role": message["role"], "content": content or ""}


def generation_kwargs(body: dict[str, Any], room: int, template_stop: list[str]) -> dict[str, Any]:
    """llama-cpp-python's completion arguments for ``body``: at most ``room`` new tokens,
    the client's stop strings and the template's, its sampling fields and logit_bias."""
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    kwargs: dict[str, Any] = {
        "max_tokens": min(requested, room) if requested else room,
        "stop": stop + template_stop,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    for key in _SAMPLING:
        if body.get(key) is not None:
            kwargs[key] = body[key]
    bias = body.get("logit_bias")
    if bias:
        try:
            kwargs["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError, AttributeError):
            raise InvalidRequestError(
                "logit_bias must map token ids to numbers.", param="logit_bias"
            ) from None
        # OpenAI's range. An infinite bias (JSON 1e309) on every token a response_format
        # grammar allows aborted the process in llama.cpp's grammar sampler.
        if not all(-100 <= v <= 100 for v in kwargs["logit_bias"].values()):
            raise InvalidRequestError("logit_bias values must be between -100 and 100.",
                                      param="logit_bias", code="invalid_value")
    return kwargs


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_chunks(model: str) -> tuple[ChunkFn, Callable[[dict[str, int]], dict[str, Any]]]:
    """For one stream (one id, one creation time): the function that builds its chunks,
    and the one that builds its closing usage chunk."""
    cid, created = completion_id(), now()

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    def usage_chunk(counts: dict[str, int]) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": None, "choices": [], "usage": counts}

    return chunk, usage_chunk


def completion(model: str, content: str, finish: str, counts: dict[str, int]) -> dict[str, Any]:
    """A whole chat.completion, stamped now."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": now(),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": finish}],
        "usage": counts,
    }
