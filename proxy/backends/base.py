"""The backend interface: one chat model behind a name, non-stream and stream.

A backend takes the client's body (a dict, unknown fields included) and returns an
OpenAI ``chat.completion`` object, or yields ``chat.completion.chunk`` objects. It
raises only :class:`proxy.errors.ProxyError` subclasses; the serving layer turns
those into HTTP errors or a stream's error frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.activation import Prefix, StateCache
from proxy.backends.stats import ActivationStats, AdapterStats
from proxy.errors import InvalidRequestError


@dataclass(slots=True)
class RequestContext:
    """Who a request runs for and what its prompt starts with. The serving layer fills
    the first fields; a backend that manages activation memory reports ``activation``
    (``hit``: the prefix's saved state was restored; ``miss``: it was computed and
    saved; ``none``: no prefix, or a backend that keeps no state)."""

    tenant: str = "default"
    prefix: Prefix | None = None
    activation: str = "none"
    #: The tenant's adapter (parametric memory): a local LoRA's name for the local
    #: backend, or the model name upstream backends call instead of their own.
    adapter: str | None = None
    upstream_model: str | None = None
    #: Work nobody waits on (memory extraction): a backend that runs one call at a
    #: time (the local model) runs it only when no request runs or waits; the others
    #: ignore it.
    background: bool = False


@dataclass(slots=True)
class Completion:
    """A non-stream reply. ``raw`` holds the upstream's bytes when they can be relayed as-is."""

    data: dict[str, Any]
    raw: bytes | None = None


@dataclass(slots=True)
class StreamEvent:
    """One stream chunk. ``raw`` holds the upstream's JSON when it can be relayed as-is."""

    data: dict[str, Any]
    raw: bytes | None = None


class ChatBackend(ABC):
    """One configured model. ``start`` and ``close`` bracket the app's lifetime.

    What a backend can do beyond chat is stated by its class attributes, and the
    methods that go with each have defaults here, so callers ask, never probe."""

    # Stop work when the client of a non-stream request leaves. Worth a watcher task
    # per request where work is expensive here (local generation); a remote upstream
    # does not stop generating because we hang up, so its backends leave it off.
    cancel_on_disconnect: bool = False
    #: Counts tokens with the model's own tokenizer (``count_tokens``): memory blocks are
    #: budgeted in it. Others are budgeted with tiktoken.
    counts_tokens: bool = False
    #: Applies LoRA files itself (``register_adapter``); others may call another model.
    takes_lora_files: bool = False
    #: Saved activation states (activation memory), for metrics; None: it keeps none.
    states: StateCache | None = None
    #: What it reports of activation memory and LoRA adapters (None: nothing).
    activation: ActivationStats | None = None
    adapter_stats: AdapterStats | None = None
    #: Answers ``POST /v1/embeddings`` (``embeddings``).
    serves_embeddings: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load or connect; called once at startup."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads and models."""

    @property
    def ready(self) -> bool:
        return True

    async def warm(self, prefix: Prefix, adapter: str | None) -> None:  # noqa: B027 - optional hook
        """Prepare for requests that will start with ``prefix`` (activation memory), run
        with ``adapter``. Backends that keep model state save it now; the others have
        nothing to do."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the model's own tokenizer (where ``counts_tokens``)."""
        raise NotImplementedError(f"{type(self).__name__} does not count tokens")

    async def register_adapter(self, name: str, path: Path, scale: float = 1.0) -> None:
        """Load a LoRA file (where ``takes_lora_files``)."""
        raise NotImplementedError(f"{type(self).__name__} takes no LoRA files")

    async def unregister_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes no LoRA files")

    async def embeddings(self, body: dict[str, Any]) -> Completion:
        """Answer an OpenAI embeddings request (where ``serves_embeddings``): ``body`` as
        the client sent it, the reply an OpenAI ``list`` of ``embedding`` objects."""
        raise InvalidRequestError(
            "This model serves no embeddings; name an embeddings model.", param="model",
            code="model_not_supported")

    #: Serves OpenAI's Responses API itself (``native_responses``): the model's
    #: ``responses: native`` setting relays /v1/responses to it.
    serves_responses: bool = False

    async def native_responses(self, body: dict[str, Any],
                               ctx: RequestContext | None = None) -> Completion:
        """Relay a Responses API request as it is (where ``serves_responses``)."""
        raise no_native_responses(body)

    async def native_responses_stream(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        """Relay a streamed Responses API request: its events, each with its raw frame."""
        raise no_native_responses(body)
        yield []  # unreachable: makes this an async generator, as overrides are

    @abstractmethod
    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        """Answer a non-stream request."""

    @abstractmethod
    def stream(self, body: dict[str, Any],
               ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Yield chunks of a stream request; the caller may stop early (client gone)."""

    async def stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        """The stream in groups, as the chunks arrived: the server writes one group at
        a time. Backends that read many chunks at once override this; by default each
        chunk is its own group."""
        chunks = self.stream(body, ctx)
        try:
            async for chunk in chunks:
                yield [StreamEvent(chunk)]
        finally:
            await chunks.aclose()

    async def text_complete(self, body: dict[str, Any],
                            ctx: RequestContext | None = None) -> Completion:
        """Answer a non-stream ``POST /v1/completions``: an OpenAI ``text_completion``."""
        raise no_text_completions(body)

    async def text_stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        """A ``POST /v1/completions`` stream of ``text_completion`` chunks, in groups as
        :meth:`stream_events` has them."""
        raise no_text_completions(body)
        yield []  # unreachable: makes this an async generator, as overrides are


def no_native_responses(body: dict[str, Any]) -> InvalidRequestError:
    model = str(body.get("model", ""))[:200]
    return InvalidRequestError(f"The model '{model}' does not serve the Responses API "
                               "natively.", param="model", code="model_not_supported")


def no_text_completions(body: dict[str, Any]) -> InvalidRequestError:
    model = str(body.get("model", ""))[:200]
    return InvalidRequestError(f"The model '{model}' does not serve /v1/completions; use "
                               "/v1/chat/completions.", param="model",
                               code="model_not_supported")


def completion_text(data: dict[str, Any]) -> str:
    """The first choice's text of a chat.completion, for write-back and logs."""
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""
