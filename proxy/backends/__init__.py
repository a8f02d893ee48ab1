"""Backends: one per configured model, chosen by ``backend`` and ``transport``.

``backend: litellm`` models whose provider speaks the OpenAI protocol are relayed
directly (``transport: auto``); litellm handles the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

from memory.activation import StateCache
from proxy.backends.base import ChatBackend, Completion
from proxy.settings import ModelConfig, UpstreamSettings

__all__ = ["ChatBackend", "Completion", "base_url_of", "build_backend", "key_env_of",
           "uses_direct_transport"]

# litellm providers that are plain OpenAI-protocol endpoints, with their default base URL.
_OPENAI_PROTOCOL = {"openai": "https://api.openai.com/v1", "hosted_vllm": None}
_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY"}


def _split(model: str) -> tuple[str, str]:
    provider, _, name = model.partition("/")
    return (provider, name) if name else ("openai", provider)


def uses_direct_transport(cfg: ModelConfig) -> bool:
    if cfg.backend != "litellm" or cfg.transport == "litellm":
        return False
    if cfg.transport == "direct":
        return True
    provider, _ = _split(cfg.model or "")
    if provider not in _OPENAI_PROTOCOL:
        return False
    return bool(cfg.api_base or _OPENAI_PROTOCOL[provider])


def key_env_of(cfg: ModelConfig) -> str | None:
    """The variable an upstream model's key is read from: ``api_key_env``, else the
    provider's usual one (``OPENAI_API_KEY`` for openai/ models)."""
    return cfg.api_key_env or _DEFAULT_KEY_ENV.get(_split(cfg.model or "")[0])


def base_url_of(cfg: ModelConfig) -> str | None:
    """Where an upstream model's requests go: ``api_base``, else the provider's base on
    the direct transport; None where litellm finds it (hosted providers)."""
    if cfg.api_base or not uses_direct_transport(cfg):
        return cfg.api_base
    return _OPENAI_PROTOCOL.get(_split(cfg.model or "")[0])


def build_backend(cfg: ModelConfig, upstream: UpstreamSettings,
                  states: StateCache | None = None) -> ChatBackend:
    """``states``: where a local model saves activation states (None: it saves none)."""
    if cfg.responses == "native" and not uses_direct_transport(cfg):
        raise ValueError(f"model '{cfg.name}': responses native needs an OpenAI-protocol "
                         "upstream on the direct transport (backend litellm, an openai/ or "
                         "hosted_vllm/ model with api_base, or transport direct)")
    if cfg.backend == "llamacpp":
        from proxy.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(
            name=cfg.name,
            path=Path(cfg.path) if cfg.path else None,
            n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads,
            states=states,
            extra_buffer_types=cfg.extra_buffer_types,
        )
    assert cfg.model is not None
    provider, name = _split(cfg.model)
    key_env = key_env_of(cfg)
    api_key = os.environ.get(key_env) if key_env else None
    timeout = cfg.timeout or upstream.timeout
    retries = cfg.max_retries if cfg.max_retries is not None else upstream.max_retries
    if uses_direct_transport(cfg):
        from proxy.backends.openai_http import OpenAIHTTPBackend

        base = cfg.api_base or _OPENAI_PROTOCOL.get(provider)
        if not base:
            raise ValueError(f"model '{cfg.name}': transport direct needs `api_base`")
        return OpenAIHTTPBackend(
            upstream_model=name,
            api_base=base,
            api_key=api_key,
            timeout=timeout,
            connect_timeout=upstream.connect_timeout,
            max_retries=retries,
            max_connections=upstream.max_connections,
        )
    from proxy.backends.litellm_backend import LiteLLMBackend

    return LiteLLMBackend(
        upstream_model=cfg.model,
        api_base=cfg.api_base,
        api_key=api_key,
        timeout=timeout,
        max_retries=retries,
    )
