"""The scale-out store: a Qdrant server or cluster, through ``qdrant-client``.

The store's logic is :class:`memory.store.qdrant.QdrantStore`'s; the collections'
layout (memories, ``<collection>_cubes``, the metadata in the collection's metadata)
is the engine's, see :mod:`memory.store.engines.server`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from qdrant_client import QdrantClient

from memory.store.engines.server import ServerEngine
from memory.store.qdrant import QdrantStore


class ServerStore(QdrantStore[ServerEngine]):
    def __init__(self, client: QdrantClient, *, collection: str = "memcube_memories",
                 embedding_model: str, dim: int, also_accept: Collection[str] = (),
                 connect_later: bool = False) -> None:
        """An unreachable server is a StoreError, unless ``connect_later``: then calls
        try again, spaced, until one gets through (see ``QdrantStore``)."""
        self.client = client
        self.collection = collection
        super().__init__(ServerEngine(client, collection), embedding_model=embedding_model, dim=dim,
                         also_accept=also_accept, connect_later=connect_later)

    @property
    def cubes_collection(self) -> str:
        return self.engine.cubes_collection

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None, *, collection: str = "memcube_memories",
                 embedding_model: str, dim: int, also_accept: Collection[str] = (), timeout: int = 10,
                 connect_later: bool = False, **client_options: Any) -> ServerStore:
        """A store on its own client (closed with the store); ``client_options`` go to
        ``QdrantClient`` (e.g. ``prefer_grpc=True``)."""
        client = QdrantClient(url=url, api_key=api_key, timeout=timeout, **client_options)
        try:
            store = cls(client, collection=collection, embedding_model=embedding_model, dim=dim,
                        also_accept=also_accept, connect_later=connect_later)
        except BaseException:
            client.close()
            raise
        store.engine.owns_client = True
        return store
