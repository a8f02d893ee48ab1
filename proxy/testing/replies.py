"""The bodies the fake upstream answers with, and that tests script: chat completions
and their chunks, text completions, Responses API objects and events, embeddings.
Each is deterministic for its input."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from typing import Any

DEFAULT_TEXT = "Hello from the fake upstream."
#: The creation time of scripted Responses API objects: fixed, so each is one value.
CREATED = 1_733_000_000


def completion(content: str = DEFAULT_TEXT, model: str = "fake-model", **message: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content, **message}
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def chunk(content: str | None = None, finish: str | None = None, model: str = "fake-model",
          **delta: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def default_stream(content: str = DEFAULT_TEXT, usage: bool = False) -> list[dict[str, Any]]:
    words = content.split(" ")
    chunks = [chunk("", role="assistant")]
    chunks += [chunk(w if i == 0 else " " + w) for i, w in enumerate(words)]
    chunks.append(chunk(finish="stop"))
    if usage:
        chunks.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                       "created": 1700000000, "model": "fake-model", "choices": [],
                       "usage": {"prompt_tokens": 5, "completion_tokens": len(words),
                                 "total_tokens": 5 + len(words)}})
    return chunks


def text_completion(texts: list[str] | None = None, model: str = "fake-model") -> dict[str, Any]:
    """A ``text_completion`` (``/completions``): one choice per text."""
    choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": "stop"}
               for i, t in enumerate(texts or [DEFAULT_TEXT])]
    return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


def text_stream(content: str = DEFAULT_TEXT, prompts: int = 1) -> list[dict[str, Any]]:
    """A ``/completions`` stream: the words of ``content`` for each prompt, in turn."""
    def one(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                "model": "fake-model", "choices": [{"text": text, "index": index,
                                                    "logprobs": None, "finish_reason": finish}]}

    words = content.split(" ")
    return [c for i in range(prompts) for c in (
        *(one(i, w if n == 0 else " " + w) for n, w in enumerate(words)), one(i, "", "stop"))]


def response_object(body: dict[str, Any], content: str = DEFAULT_TEXT,
                    status: str = "completed") -> dict[str, Any]:
    """A Responses API response to ``body``, as a native upstream answers."""
    return {"id": "resp_upstream_" + hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16],
            "object": "response", "created_at": CREATED, "status": status,
            "model": body.get("model", "fake-model"), "instructions": body.get("instructions"),
            "output": [{"type": "message", "id": "msg_up", "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": content, "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "previous_response_id": body.get("previous_response_id"),
            "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}


def response_events(body: dict[str, Any], content: str = DEFAULT_TEXT) -> list[bytes]:
    """The Responses API stream of :func:`response_object`, as SSE frames."""
    done = response_object(body, content)
    start = {**done, "status": "in_progress", "output": [], "usage": None}
    item = done["output"][0]
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **at,
         "part": {"type": "output_text", "text": "", "annotations": []}},
        *({"type": "response.output_text.delta", **at, "delta": word}
          for word in re.findall(r"\S+\s*", content)),
        {"type": "response.output_text.done", **at, "text": content},
        {"type": "response.content_part.done", **at, "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": done}]
    return [f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
            for n, e in enumerate(events)]


def embedding(text: str, dim: int = 384) -> list[float]:
    """The vector :class:`Embeddings` answers for ``text``."""
    vec = [0.0] * dim
    vec[0] = 0.5  # never the zero vector, not even for a text without words
    for word in re.findall(r"\w+", text.lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vec[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    norm = sum(v * v for v in vec) ** 0.5
    return [v / norm for v in vec]


def embeddings_reply(body: dict[str, Any], dim: int = 384) -> dict[str, Any]:
    raw = body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    if inputs and isinstance(inputs[0], int):
        inputs = [inputs]  # one list of token ids is one input
    # Token arrays are embedded by their JSON text: stable, if meaningless.
    texts = [item if isinstance(item, str) else json.dumps(item) for item in inputs]
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vec = embedding(text, dim)
        value: Any = vec
        if body.get("encoding_format") == "base64":
            value = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = sum(len(t.split()) for t in texts)
    return {"object": "list", "data": data, "model": body.get("model", "fake-embedding"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
