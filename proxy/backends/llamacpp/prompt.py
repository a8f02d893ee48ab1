"""A chat's prompt in the model's own terms: the chat template rendered with stand-ins
for the contents, its pieces tokenized, and the plan of its activation prefix.

Message contents are tokenized as plain text, never parsed for control tokens: only
the chat template's own text is. A memory (or a user) writing ``<|im_start|>system``
gets those characters, not a system turn.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from memory.activation import Prefix, state_key

log = logging.getLogger(__name__)

_PLANS_KEPT = 256  # prefixes whose tokens are remembered
#: A rendered prompt in pieces: (text, whether its control tokens are parsed).
Pieces = list[tuple[str, bool]]


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """The tokens of a prompt's activation prefix and the key of their saved state."""

    tokens: tuple[int, ...]
    key: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """A chat rendered and tokenized. ``head``: its pieces up to the end of the first
    message's content (empty: unknown); ``stop``: the template's stop strings."""

    tokens: list[int]
    head: Pieces
    add_bos: bool
    stop: list[str]


def chat_formatter(llm: Any, path: Path) -> Any:
    """The model's chat template (from its GGUF), ready to render chats."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError(f"{path} has no chat template")

    def token_text(token: int) -> str:
        return str(llm._model.token_get_text(token)) if token != -1 else ""

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llm.token_eos()),
        bos_token=token_text(llm.token_bos()),
    )


class PromptBuilder:
    """Renders and tokenizes chats for one model, once it has the loaded model
    (``llm``), its chat template (``formatter``) and its identity (``model_id``)."""

    def __init__(self) -> None:
        # Marks message contents in a rendered template. Secret and random per process, so
        # no content can forge it; fixed, so its pattern is compiled once.
        self._stand_in_tag = secrets.token_hex(8)
        self._stand_in = re.compile(f"\ue000{self._stand_in_tag}:(\\d+)\ue001")
        self._plans: LRUCache[tuple[Any, ...], PrefixPlan] = LRUCache(maxsize=_PLANS_KEPT)
        self.llm: Any = None
        self.formatter: Any = None
        self.model_id = ""

    def count(self, text: str) -> int:
        """Tokens of ``text`` as plain text, without BOS."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def end_tokens(self) -> set[int]:
        """The tokens that end a turn: EOS and those of the template's own end text."""
        llm = self.llm
        end = self.formatter.eos_token.encode("utf-8")
        return {llm.token_eos(), *llm.tokenize(end, add_bos=False, special=True)}

    def build(self, messages: list[dict[str, str]]) -> Prompt:
        """``messages`` (plain text contents) rendered and tokenized."""
        pieces, head, formatted = self.render(messages)
        add_bos = not formatted.added_special
        stop = formatted.stop or []
        return Prompt(tokens=self.tokenize(pieces, add_bos), head=pieces[:head], add_bos=add_bos,
                      stop=[stop] if isinstance(stop, str) else list(stop))

    def render(self, messages: list[dict[str, str]]) -> tuple[Pieces, int, Any]:
        """The chat in the model's template, in pieces: the template's own text, whose
        control tokens are meant, and each message's content, which is only text; how
        many pieces end with the first message's content (0: unknown); the formatter's
        result (stop strings, BOS).

        The template is rendered with a stand-in for each content, so no content can
        pass for template text however it is written."""
        tag = self._stand_in_tag
        stand_ins = [{**m, "content": f"\ue000{tag}:{i}\ue001"} for i, m in enumerate(messages)]
        formatted = self.formatter(messages=stand_ins)
        parts = self._stand_in.split(formatted.prompt)
        if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
            # The template dropped or altered a content: take its text as rendered, as
            # llama.cpp's server does (memories are neutralised when injected anyway).
            log.debug("chat template does not show contents verbatim; tokenizing it whole")
            formatted = self.formatter(messages=messages)
            return [(formatted.prompt, True)], 0, formatted
        pieces: Pieces = []
        head = 0
        for n, part in enumerate(parts):
            if n % 2 == 0:
                pieces.append((part, True))
                continue
            pieces.append((messages[int(part)]["content"], False))
            if part == "0":
                head = len(pieces)
        return pieces, head, formatted

    def tokenize(self, pieces: Pieces, add_bos: bool) -> list[int]:
        tokens: list[int] = []
        for text, special in pieces:
            if text:
                tokens += self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos and not tokens,
                                            special=special)
        if add_bos and not tokens:
            tokens = self.llm.tokenize(b"", add_bos=True, special=False)
        return tokens

    def plan(self, prefix: Prefix, messages: list[dict[str, str]], prompt: Prompt,
             adapter: str | None) -> PrefixPlan | None:
        """The prefix's tokens: the prompt up to the end of the first message's content
        (the activation blocks, ``prompt.head``), if they are also the start of the
        prompt's tokens. ``adapter``: the identity of the adapter it runs with.

        Every request of a user starts with the same prefix, so its tokens and key are
        remembered (tokenizing a 2k-token block took 2.4 ms on the event loop)."""
        content = prefix.content
        if not messages or messages[0].get("content") != content or not prompt.head:
            return None
        tokens = prompt.tokens
        cache_key = (tuple(prompt.head), prompt.add_bos, adapter, prefix.tenant, prefix.parts)
        plan = self._plans.get(cache_key)  # a hit is now the most recently used
        if plan is None:
            head = self.tokenize(prompt.head, prompt.add_bos)
            plan = PrefixPlan(tokens=tuple(head), key=state_key(
                model=self.model_id, adapter=adapter, prefix=prefix, tokens=head))
            self._plans[cache_key] = plan
        n = len(plan.tokens)
        if n >= len(tokens) or tuple(tokens[:n]) != plan.tokens:
            return None  # the template merges the block with what follows: no prefix
        return plan
