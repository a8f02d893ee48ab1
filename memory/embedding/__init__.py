"""Embedders: text -> dense vectors. Local MiniLM by default (memory.embedding.minilm),
any embeddings API through litellm (memory.embedding.litellm_embedder); both import
heavy libraries, so they are imported where chosen, not here."""

from memory.embedding.base import Embedder, HashEmbedder

__all__ = ["Embedder", "HashEmbedder"]
