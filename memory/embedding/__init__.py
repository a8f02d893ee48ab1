"""Embedders: text -> dense vectors. Local MiniLM by default, any API through litellm."""

from memory.embedding.base import Embedder, HashEmbedder

__all__ = ["Embedder", "HashEmbedder"]
