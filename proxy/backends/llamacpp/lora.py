"""Parametric memory on the local model: the LoRA adapters registered with it, the
least recently used ones loaded in llama.cpp, and the one applied to the context.

Registering, unregistering and applying run on the worker thread (:mod:`.bridge`),
which owns the context; the loop only reads the registered adapters.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from memory.parametric import AdapterError
from memory.parametric import inspect as inspect_adapter
from proxy.backends.stats import AdapterStats
from proxy.errors import ProxyError

#: A loaded adapter: the identity of its spec and llama.cpp's pointer to its weights.
Loaded = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """A registered LoRA adapter: its file and scale. ``ident`` changes with the file."""

    name: str
    path: Path
    scale: float
    ident: str

    @classmethod
    def of(cls, name: str, path: Path, scale: float) -> LoraSpec:
        try:
            st = path.stat()
        except OSError as exc:
            raise AdapterError(f"cannot read {path}: {exc.strerror}") from None
        return cls(name=name, path=path, scale=scale,
                   ident=f"{name}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{scale}")


class _LoadedLru(LRUCache[str, Loaded]):
    """Loaded adapters by name. What the LRU lets go to make room goes to ``evicted``
    (which frees its weights); ``pop`` and ``del`` only forget an entry."""

    def __init__(self, maxsize: int, evicted: Callable[[str, Loaded], None]) -> None:
        super().__init__(maxsize)
        self._evicted = evicted

    def popitem(self) -> tuple[str, Loaded]:
        name, entry = super().popitem()
        self._evicted(name, entry)
        return name, entry


class Loras:
    """The adapters of one model. ``llm`` is set once the model is loaded; at most
    ``max_adapters`` (at least one) stay loaded, a change applying at the next use."""

    def __init__(self, max_adapters: int) -> None:
        self.llm: Any = None
        self.max_adapters = max_adapters
        self.stats = AdapterStats()
        self.registered: dict[str, LoraSpec] = {}
        self._loaded = _LoadedLru(max(1, max_adapters), self._evict)
        self._applied: str | None = None  # the adapter set on the context now

    def ident(self, name: str | None) -> str | None:
        """The identity of registered adapter ``name`` (None: none, or not registered)."""
        spec = self.registered.get(name) if name else None
        return spec.ident if spec is not None else None

    def register(self, spec: LoraSpec, model: Path) -> None:
        """Check ``spec`` against the model file ``model`` and load it; raises
        AdapterError (and changes nothing) if it is not a LoRA that fits."""
        info = inspect_adapter(spec.path, model)
        if not info.fits:
            raise AdapterError(f"{spec.path} does not fit this model: " + "; ".join(info.problems))
        pointer = self._load(spec)
        self.unregister(spec.name)  # a replaced adapter's old weights go
        self.registered[spec.name] = spec
        self._keep(spec.name, spec.ident, pointer)

    def unregister(self, name: str) -> None:
        self.registered.pop(name, None)
        if name in self._loaded:
            self._free(name)

    def apply(self, name: str | None) -> str | None:
        """Set ``name``'s adapter on the context (None: no adapter), loading it again if
        the LRU let it go; its identity, for cache keys and context ownership."""
        import llama_cpp

        self.stats.requests[name or ""] = self.stats.requests.get(name or "", 0) + 1
        if name is None:
            if self._applied is not None:
                llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
                self._applied = None
            return None
        spec = self.registered.get(name)
        if spec is None:
            raise ProxyError(f"adapter '{name}' is not registered with the local model",
                             code="adapter_unavailable")
        entry = self._loaded.get(name)  # now the most recently used
        if entry is None or entry[0] != spec.ident:
            if entry is not None:
                self._free(name)
            self._keep(name, spec.ident, self._load(spec))
        else:
            self._fit()
        if self._applied != name:
            pointer = self._loaded[name][1]
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer)
            scales = (ctypes.c_float * 1)(spec.scale)
            if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales) != 0:
                raise ProxyError(f"adapter '{name}' could not be applied", code="model_error")
            self._applied = name
        return spec.ident

    def _load(self, spec: LoraSpec) -> Any:
        import llama_cpp

        pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(spec.path).encode())
        if not pointer:
            raise AdapterError(f"llama.cpp refused {spec.path} as a LoRA for this model")
        self.stats.loads += 1
        return pointer

    def _keep(self, name: str, ident: str, pointer: Any) -> None:
        """Keep a loaded adapter as the most recently used; the least recently used
        beyond ``max_adapters`` are freed (never this one)."""
        self._fit()
        self._loaded[name] = (ident, pointer)

    def _fit(self) -> None:
        """Follow a change of ``max_adapters``: the adapters move to an LRU of the new
        size, least recently used first, so those beyond it are evicted and freed."""
        size = max(1, self.max_adapters)
        if self._loaded.maxsize == size:
            return
        old, self._loaded = self._loaded, _LoadedLru(size, self._evict)
        while old:
            name, entry = LRUCache.popitem(old)  # oldest first; the base popitem frees nothing
            self._loaded[name] = entry  # beyond ``size``, the new LRU evicts the oldest

    def _free(self, name: str) -> None:
        self._release(name, self._loaded.pop(name)[1])

    def _evict(self, name: str, entry: Loaded) -> None:
        self._release(name, entry[1])
        self.stats.evictions += 1

    def _release(self, name: str, pointer: Any) -> None:
        import llama_cpp

        if self._applied == name:
            llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
            self._applied = None
        llama_cpp.llama_adapter_lora_free(pointer)
