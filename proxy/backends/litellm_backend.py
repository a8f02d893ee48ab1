"""Upstreams that need translation (Anthropic, Bedrock, Vertex, ...) through litellm.

litellm is imported on first use only: it takes seconds to import and is not
needed by a proxy that serves the local model or OpenAI-compatible upstreams.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator
from typing import Any

from memory import offline
from proxy.backends.base import ChatBackend, Completion, RequestContext, StreamEvent
from proxy.errors import (
    InvalidRequestError,
    ProxyError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    upstream_error_from_status,
)

log = logging.getLogger(__name__)


def _litellm() -> Any:
    offline.configure()
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


class LiteLLMBackend(ChatBackend):
    """An upstream that needs translation, through litellm."""

    serves_embeddings = True

    def __init__(
        self,
        *,
        upstream_model: str,
        api_base: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
    ) -> None:
        self.upstream_model = upstream_model
        self.api_base = api_base
        self._api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self._llm = _litellm()
        self._params = set(inspect.signature(self._llm.acompletion).parameters) - {"kwargs"}
        # Text completions take text_completion's own parameters and pass the rest on to
        # litellm's completion (seed and the like).
        self._text_params = self._params | (
            set(inspect.signature(self._llm.text_completion).parameters) - {"args", "kwargs"})

    async def close(self) -> None:
        # litellm runs a logging task on the serving loop; stop it with the loop's owner.
        try:
            from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
        except ImportError:
            return
        await GLOBAL_LOGGING_WORKER.stop()

    def _kwargs(self, body: dict[str, Any], stream: bool,
                ctx: RequestContext | None = None, *, text: bool = False) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        params = self._text_params if text else self._params
        for key, value in body.items():
            if key == "model":
                continue
            (kwargs if key in params else extra)[key] = value
        if extra:
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
        kwargs.update(
            # The tenant's adapter, when it names a model, replaces ours.
            model=(ctx.upstream_model if ctx is not None and ctx.upstream_model
                   else self.upstream_model),
            stream=stream,
            timeout=self.timeout,
            num_retries=self.max_retries,
            # With `tools`, litellm otherwise routes through its MCP gateway, which imports
            # the optional `mcp` package (litellm[proxy]); plain tool calls need none of it.
            _skip_mcp_handler=True,
        )
        return self._where(kwargs)

    def _where(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Add where the upstream is and its key to litellm's ``kwargs``."""
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        elif self.api_base and self.upstream_model.startswith(("openai/", "hosted_vllm/")):
            # Keyless OpenAI-compatible servers (Ollama, vLLM): the OpenAI SDK under
            # litellm refuses to start without some key.
            kwargs["api_key"] = "no-key"
        return kwargs

    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        try:
            response = await self._llm.acompletion(**self._kwargs(body, stream=False, ctx=ctx))
        except Exception as exc:
            raise self.map_error(exc) from None
        return Completion(data=response.model_dump(exclude_none=False))

    async def stream(self, body: dict[str, Any],
                     ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        try:
            response = await self._llm.acompletion(**self._kwargs(body, stream=True, ctx=ctx))
            async for chunk in response:
                yield chunk.model_dump(exclude_none=True)
        except ProxyError:
            raise
        except Exception as exc:
            raise self.map_error(exc) from None

    async def text_complete(self, body: dict[str, Any],
                            ctx: RequestContext | None = None) -> Completion:
        try:
            response = await self._llm.atext_completion(
                **self._kwargs(body, stream=False, ctx=ctx, text=True))
        except Exception as exc:
            raise self.map_error(exc) from None
        return Completion(data=response.model_dump(exclude_none=False))

    async def text_stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
            # litellm's text stream numbers every choice 0: the prompts' texts would mix.
            raise InvalidRequestError("Streaming several prompts is not supported for this "
                                      "model (litellm transport): send them without stream, "
                                      "or one a request.", param="prompt")
        try:
            response = await self._llm.atext_completion(
                **self._kwargs(body, stream=True, ctx=ctx, text=True))
            async for chunk in response:
                data = chunk if isinstance(chunk, dict) else chunk.model_dump(exclude_none=True)
                for choice in data.get("choices") or []:  # litellm drops what is None
                    choice.setdefault("text", "")
                    choice.setdefault("logprobs", None)
                    choice.setdefault("finish_reason", None)
                yield [StreamEvent(data)]
        except ProxyError:
            raise
        except Exception as exc:
            raise self.map_error(exc) from None

    async def embeddings(self, body: dict[str, Any]) -> Completion:
        """litellm's embedding call, its reply in OpenAI's shape. Floats are asked for
        (providers that know no ``encoding_format`` refuse it) and encoded as the client
        asked. The configured model, never a tenant's adapter: adapters name chat
        models. litellm turns ``max_retries: 0`` into its default of 2 on embeddings."""
        known = {"input", "dimensions", "user"}
        kwargs: dict[str, Any] = {k: v for k, v in body.items() if k in known and v is not None}
        extra = {k: v for k, v in body.items()
                 if k not in known and k not in ("model", "encoding_format")}
        if extra:
            kwargs["extra_body"] = extra
        if "dimensions" in kwargs:  # litellm allows it on OpenAI's text-embedding-3 only
            kwargs["allowed_openai_params"] = ["dimensions"]
        kwargs.update(model=self.upstream_model, timeout=self.timeout,
                      max_retries=self.max_retries)
        self._where(kwargs)
        try:
            response = await self._llm.aembedding(**kwargs)
        except Exception as exc:
            raise self.map_error(exc) from None
        return Completion(data=_openai_embeddings(response, body.get("encoding_format"),
                                                  self.upstream_model))

    def map_error(self, exc: Exception) -> ProxyError:
        """What a litellm failure means to the client."""
        llm = self._llm
        if isinstance(exc, ProxyError):
            return exc
        if isinstance(exc, llm.Timeout):
            return UpstreamTimeoutError("upstream timed out")
        if isinstance(exc, llm.APIConnectionError):
            # litellm reports malformed JSON replies as connection errors too.
            text = str(exc)
            if "JSON" in text or "decode" in text.lower():
                return UpstreamError("upstream returned a malformed reply")
            return UpstreamUnavailableError("upstream unreachable")
        # A reply's own 4xx first: its chain may hold the connection errors of retries
        # before it, and the client must see the 429 or 400 the upstream gave.
        status = getattr(exc, "status_code", None)
        message = getattr(exc, "message", None) or str(exc)
        if isinstance(status, int) and 400 <= status < 500:
            return upstream_error_from_status(
                status, _error_json(message.split(" - ", 1)[-1])
            )
        cause = _transport_cause(exc)
        if cause is not None:
            return cause
        log.warning("upstream error via litellm: %s", type(exc).__name__)
        return UpstreamError(f"upstream error: {type(exc).__name__}")


def _transport_cause(exc: BaseException) -> ProxyError | None:
    """litellm reports some transport failures as a 500 (a refused connection comes as
    ``InternalServerError: Connection error.``); the exception chain says what it was."""
    import openai

    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, (openai.APITimeoutError, TimeoutError)):
            return UpstreamTimeoutError("upstream timed out")
        if isinstance(link, (openai.APIConnectionError, ConnectionError)):
            return UpstreamUnavailableError("upstream unreachable")
        link = link.__cause__ or link.__context__
    return None


def _openai_embeddings(response: Any, encoding_format: str | None, model: str) -> dict[str, Any]:
    from proxy.embeddings.protocol import encode_vector

    data = []
    for index, item in enumerate(response.data or []):
        entry = item if isinstance(item, dict) else item.model_dump()
        data.append({"object": "embedding", "index": entry.get("index", index),
                     "embedding": encode_vector(entry["embedding"], encoding_format)})
    usage = getattr(response, "usage", None)
    prompt = getattr(usage, "prompt_tokens", None) or 0
    total = getattr(usage, "total_tokens", None) or prompt
    return {"object": "list", "data": data, "model": getattr(response, "model", None) or model,
            "usage": {"prompt_tokens": prompt, "total_tokens": total}}


def _error_json(message: str) -> bytes:
    import json

    try:
        json.loads(message)
        return message.encode()
    except ValueError:
        return json.dumps({"error": {"message": message}}).encode()
