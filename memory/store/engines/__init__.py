"""Engines: the Qdrant SDKs behind :class:`memory.store.qdrant.QdrantStore`, one each."""
