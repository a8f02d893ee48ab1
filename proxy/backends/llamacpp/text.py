"""Legacy text completions (``POST /v1/completions``) at the local model's edge: what of
a request it honours or refuses, its prompts as tokens, and the ``text_completion``
objects and chunks it answers with.

A prompt is the client's whole text, chat template and all, so it is tokenized as
llama.cpp's own server and llama-cpp-python tokenize one: with the model's BOS, and
control-token text parsed (``<|im_start|>`` written in a prompt is that token).
"""

from __future__ import annotations

import uuid
from typing import Any

from proxy.backends.llamacpp.schema import generation_kwargs
from proxy.errors import InvalidRequestError
from proxy.protocol import now

#: OpenAI's default ``max_tokens`` for text completions.
DEFAULT_MAX_TOKENS = 16


def check_request(body: dict[str, Any]) -> list[str]:
    """The prompts, one a choice; refuses what the local model cannot do (400s, before
    any work)."""
    if (body.get("n") or 1) != 1:
        raise InvalidRequestError("The local model supports only n=1 (send several prompts "
                                  "for several choices).", param="n")
    if (body.get("best_of") or 1) != 1:
        raise InvalidRequestError("best_of is not supported by the local model.",
                                  param="best_of")
    if body.get("logprobs") is not None:
        raise InvalidRequestError("logprobs is not supported by the local model.",
                                  param="logprobs")
    if body.get("suffix"):
        raise InvalidRequestError("suffix (insertion) is not supported by the local model.",
                                  param="suffix")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InvalidRequestError("The local model takes the prompt as text (a string or a list "
                              "of strings), not token ids.", param="prompt")


def tokenize(llm: Any, text: str) -> list[int]:
    """``text`` as the model's tokens: BOS where the model wants one, control tokens parsed.
    Never empty: an empty prompt is BOS alone (or EOS, for a model without BOS)."""
    bos = llm.token_bos()
    head = [bos] if bos != -1 and llm._model.add_bos_token() else []
    tokens = head + (llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                     if text else [])
    return tokens or [bos if bos != -1 else llm.token_eos()]


def check_room(n_ctx: int, tokens: list[int], index: int, several: bool) -> int:
    """How many tokens may be generated after the prompt, or a 400 if it fills the context."""
    room = n_ctx - len(tokens)
    if room <= 0:
        param = f"prompt.[{index}]" if several else "prompt"
        raise InvalidRequestError(
            f"This model's maximum context length is {n_ctx} tokens; the prompt takes "
            f"{len(tokens)}.", param=param, code="context_length_exceeded")
    return room


def completion_kwargs(body: dict[str, Any], room: int) -> dict[str, Any]:
    """llama-cpp-python's completion arguments: the chat ones, with the client's stop
    strings only and OpenAI's default of 16 new tokens."""
    requested = body.get("max_tokens") or DEFAULT_MAX_TOKENS
    return generation_kwargs({**body, "max_tokens": requested, "max_completion_tokens": None},
                             room, [])


class TextCompletion:
    """The objects of one request: one id and creation time for all its chunks."""

    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = now()
        self.model = model

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None}

    def chunk(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {**self._head(), "choices": [{"text": text, "index": index, "logprobs": None,
                                             "finish_reason": finish}]}

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": counts}

    def whole(self, choices: list[tuple[str, str]], counts: dict[str, int]) -> dict[str, Any]:
        """The non-stream reply: (text, finish reason) per prompt, in order."""
        return {**self._head(), "usage": counts, "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(choices)]}
