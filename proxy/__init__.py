"""MemCube Proxy: the OpenAI-compatible HTTP surface, backends and CLI."""

__version__ = "0.1.0"
