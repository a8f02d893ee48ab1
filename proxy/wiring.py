"""The composition root: from settings to an :class:`~proxy.context.AppContext`.

Every choice of component is made here and nowhere else: a backend per configured
model (a local model gets its activation-state cache), the adapter and tenant
registries, and how memory opens: Qdrant Edge under ``data_dir`` unless ``qdrant.url``
names a server; MiniLM through llama.cpp unless ``memory.embedder`` names an
embeddings API; fine extraction through one of the configured models.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from memory.activation import Prefix, StateCache
from memory.embedding.base import Embedder
from memory.extract import FineExtractor
from memory.inject import TokenCounter, tiktoken_counter
from memory.layer import MemoryLayer, NullMemory
from memory.outbox import Outbox
from memory.service import MemoryConfig, MemoryService
from memory.store.base import MemoryStore, StoreError
from proxy.admin.adapters import AdapterRegistry
from proxy.admin.tenants import TenantRegistry
from proxy.backends import ChatBackend, build_backend
from proxy.backends.base import RequestContext, completion_text
from proxy.context import AppContext
from proxy.observability import Metrics
from proxy.responses.store import ResponseStore
from proxy.settings import ModelConfig, Settings
from proxy.startup import store_error
from proxy.upstreams import UpstreamHealth

if TYPE_CHECKING:
    from proxy.embeddings.local import LocalEmbeddings

log = logging.getLogger(__name__)


def build_context(settings: Settings, *, memory: MemoryLayer | None = None) -> AppContext:
    """``memory``: a memory layer to use instead of opening one from the settings (tests)."""
    backends = {cfg.name: build_backend(cfg, settings.upstream, activation_states(settings, cfg))
                for cfg in settings.models}
    adapters = AdapterRegistry(settings, backends)
    ctx = AppContext(settings=settings, backends=backends, adapters=adapters,
                     tenants=TenantRegistry(settings), metrics=Metrics(),
                     started_at=int(time.time()), layer=memory or NullMemory(),
                     upstreams=UpstreamHealth(settings))
    if settings.responses.retention_days > 0:
        ctx.responses = ResponseStore(settings.data_dir / "responses.sqlite3",
                                      settings.responses.retention_days)
    if settings.embeddings.local_model:
        ctx.embeddings = local_embeddings(settings, ctx)
    if memory is None and settings.memory.enabled:
        ctx.open_memory = partial(open_memory, settings, backends, adapters)
    ctx.metrics.watch_activation(backends)
    ctx.metrics.watch_memory(lambda: ctx.memory)
    return ctx


def activation_states(settings: Settings, cfg: ModelConfig) -> StateCache | None:
    """Where a local model keeps its saved activation states, if activation is on."""
    act = settings.activation
    if cfg.backend != "llamacpp" or not act.enabled or not settings.memory.enabled:
        return None
    directory = settings.data_dir / "activation" / cfg.name if act.disk_bytes else None
    return StateCache(directory, ram_bytes=act.ram_bytes, disk_bytes=act.disk_bytes)


def local_embeddings(settings: Settings, ctx: AppContext) -> LocalEmbeddings:
    """The embedded MiniLM on /v1/embeddings: memory's own when memory embeds with it,
    else one loaded on first use, where memory would convert it."""
    from memory.embedding.minilm import MiniLMEmbedder
    from proxy.embeddings.local import LocalEmbeddings

    assert settings.embeddings.local_model is not None
    cfg = settings.memory.embedder
    load = partial(MiniLMEmbedder, cfg.cache_dir or settings.data_dir / "models",
                   n_threads=cfg.n_threads, extra_buffer_types=cfg.extra_buffer_types)
    return LocalEmbeddings(settings.embeddings.local_model, load,
                           shared=lambda: ctx.memory.embedder if ctx.memory is not None else None)


# -- memory ---------------------------------------------------------------------------------

def build_embedder(settings: Settings) -> Embedder:
    cfg = settings.memory.embedder
    if cfg.backend == "litellm":
        from memory.embedding.litellm_embedder import LiteLLMEmbedder

        assert cfg.model is not None
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        return LiteLLMEmbedder(cfg.model, dim=cfg.dim, api_base=cfg.api_base, api_key=key)
    from memory.embedding.minilm import MiniLMEmbedder

    return MiniLMEmbedder(cfg.cache_dir or settings.data_dir / "models",
                          n_threads=cfg.n_threads, extra_buffer_types=cfg.extra_buffer_types)


def build_store(settings: Settings, embedder: Embedder) -> MemoryStore:
    """The store, open; one that cannot be opened is a StartupError (one line)."""
    try:
        if settings.qdrant.url:
            from memory.store.server import ServerStore

            key_env = settings.qdrant.api_key_env
            return ServerStore.from_url(settings.qdrant.url,
                                        api_key=os.environ.get(key_env) if key_env else None,
                                        embedding_model=embedder.model_id, dim=embedder.dim,
                                        also_accept=embedder.same_space, connect_later=True)
        from memory.store.edge import EdgeStore

        return EdgeStore(settings.data_dir / "qdrant", embedding_model=embedder.model_id,
                         dim=embedder.dim, also_accept=embedder.same_space)
    except StoreError as exc:
        raise store_error(exc, settings.data_dir) from None


def token_counter(backends: dict[str, ChatBackend], model: str) -> TokenCounter:
    """The local model counts with its own tokenizer; upstream models with tiktoken."""
    backend = backends.get(model)
    return backend.count_tokens if backend is not None and backend.counts_tokens else tiktoken_counter()


def open_memory(settings: Settings, backends: dict[str, ChatBackend],
                adapters: AdapterRegistry) -> MemoryService:
    """The memory service the settings describe (blocking: it loads the embedder)."""
    if not all(b.counts_tokens for b in backends.values()):
        # Loaded now, at start-up off the event loop: the first request would otherwise
        # stall the loop some 0.3 s reading the encoding (bench/load.py).
        tiktoken_counter()
    embedder = build_embedder(settings)
    store = build_store(settings, embedder)
    mem = settings.memory
    fine = None
    if mem.extraction == "fine":
        assert mem.extraction_model is not None
        extractor = backends[mem.extraction_model]

        async def complete(messages: list[dict[str, str]], *, response_format: dict[str, Any],
                           max_tokens: int, tenant: str) -> str:
            body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens,
                    "response_format": response_format}
            # Background: the local model serves waiting requests first.
            reply = await extractor.complete(body, RequestContext(tenant=tenant, background=True))
            return completion_text(reply.data)

        fine = FineExtractor(complete, max_tokens=mem.extraction_max_tokens,
                             timeout=mem.extraction_timeout)
    act = settings.activation
    config = MemoryConfig(enabled=mem.enabled, top_k=mem.top_k, max_tokens=mem.max_tokens,
                          extraction=mem.extraction, activation=act.enabled,
                          activation_tokens=act.max_tokens,
                          activation_refresh=act.refresh_seconds)

    async def warm(model: str, prefix: Prefix) -> None:
        # Backends that keep model state (the local one) save the new prefix's state now,
        # so the next request that starts with it restores instead of computing it.
        backend = backends.get(model)
        if backend is not None:
            await backend.warm(prefix, adapters.local_adapter(prefix.tenant))

    return MemoryService(store=store, embedder=embedder,
                         outbox=Outbox(settings.data_dir / "outbox.sqlite3"), config=config,
                         counter_for=partial(token_counter, backends), fine=fine,
                         on_prefix_changed=warm)
