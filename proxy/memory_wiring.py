"""Build the memory layer from settings: store, embedder, outbox, extraction.

Kept apart from the app factory so the choice of components reads in one place:
Qdrant Edge under ``data_dir`` unless ``qdrant.url`` names a server; MiniLM through
llama.cpp unless ``memory.embedder`` names an embeddings API; fine extraction calls
one of the configured models through its own backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from memory.activation import Prefix
from memory.embedding.base import Embedder
from memory.extract import FineExtractor
from memory.inject import TokenCounter, tiktoken_counter
from memory.outbox import Outbox
from memory.service import MemoryConfig, MemoryService
from memory.store.base import MemoryStore
from proxy.backends.base import ChatBackend, completion_text
from proxy.settings import Settings

log = logging.getLogger(__name__)


def build_embedder(settings: Settings) -> Embedder:
    cfg = settings.memory.embedder
    if cfg.backend == "litellm":
        from memory.embedding.litellm_embedder import LiteLLMEmbedder

        assert cfg.model is not None
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        return LiteLLMEmbedder(cfg.model, dim=cfg.dim, api_base=cfg.api_base, api_key=key)
    from memory.embedding.minilm import MiniLMEmbedder

    return MiniLMEmbedder(cfg.cache_dir or settings.data_dir / "models",
                          extra_buffer_types=cfg.extra_buffer_types)


def build_store(settings: Settings, embedder: Embedder) -> MemoryStore:
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


def token_counters(backends: dict[str, ChatBackend]) -> Callable[[str], TokenCounter]:
    """The local model counts with its own tokenizer; upstream models with tiktoken."""

    if any(not callable(getattr(b, "count_tokens", None)) for b in backends.values()):
        # Loaded now, at start-up off the event loop: the first request would otherwise
        # stall the loop some 0.3 s reading the encoding (bench/load.py).
        tiktoken_counter()

    def counter_for(model: str) -> TokenCounter:
        backend = backends.get(model)
        count = getattr(backend, "count_tokens", None)
        return count if callable(count) else tiktoken_counter()

    return counter_for


def build_memory(settings: Settings, backends: dict[str, ChatBackend]) -> MemoryService:
    embedder = build_embedder(settings)
    store = build_store(settings, embedder)
    mem = settings.memory
    fine = None
    if mem.extraction == "fine":
        assert mem.extraction_model is not None
        extractor = backends[mem.extraction_model]

        async def complete(messages: list[dict[str, str]]) -> str:
            reply = await extractor.complete({"messages": messages, "temperature": 0})
            return completion_text(reply.data)

        fine = FineExtractor(complete)
    act = settings.activation
    config = MemoryConfig(enabled=mem.enabled, top_k=mem.top_k, max_tokens=mem.max_tokens,
                          extraction=mem.extraction, activation=act.enabled,
                          activation_tokens=act.max_tokens,
                          activation_refresh=act.refresh_seconds)
    service = MemoryService(store=store, embedder=embedder,
                            outbox=Outbox(settings.data_dir / "outbox.sqlite3"), config=config,
                            counter_for=token_counters(backends), fine=fine)

    async def warm(model: str, prefix: Prefix) -> None:
        # Backends that keep model state (the local one) save the new prefix's state now,
        # so the next request that starts with it restores instead of computing it.
        backend = backends.get(model)
        if backend is not None:
            await backend.warm(prefix)

    service.add_prefix_listener(warm)
    return service
