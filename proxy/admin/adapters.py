"""Parametric memory's registry: which adapter each tenant's requests run with.

Adapters and bindings come from the config (``adapters:``, ``tenants[].adapter``),
overlaid by what the admin API changed (``PUT|DELETE /v1/adapters/{name}``). Only
those changes are saved, in ``data_dir/adapters.json``, and applied again at startup:
a later edit of the config file takes effect for everything the API did not change.
A LoRA file is checked against every local model when it is registered: one that does
not fit is refused, and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory.fsutil import write_json_atomic
from memory.parametric import AdapterError, inspect
from proxy.backends.base import ChatBackend, RequestContext
from proxy.settings import AdapterConfig, Settings

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


@dataclass(slots=True)
class AdapterChanges:
    """What the admin API changed over the config: adapters put, config adapters
    deleted, and tenants bound."""

    put: dict[str, AdapterConfig] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    bindings: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"adapters": [a.model_dump() for a in self.put.values()],
                "removed": sorted(self.removed), "bindings": self.bindings}

    @classmethod
    def from_json(cls, saved: dict[str, Any], config: dict[str, AdapterConfig],
                  config_bindings: dict[str, str]) -> AdapterChanges:
        put = {a["name"]: AdapterConfig.model_validate(a) for a in saved.get("adapters", [])}
        # Files written before only the changes were saved hold the config's entries too:
        # an entry equal to the config's is no change.
        put = {n: a for n, a in put.items() if config.get(n) != a}
        bindings = {t: a for t, a in saved.get("bindings", {}).items() if config_bindings.get(t) != a}
        return cls(put=put, removed=set(saved.get("removed", [])) & set(config), bindings=bindings)


class AdapterRegistry:
    def __init__(self, settings: Settings, backends: dict[str, ChatBackend]) -> None:
        self._config = {a.name: a for a in settings.adapters}
        self._config_bindings = {t.id: t.adapter for t in settings.tenants if t.adapter}
        self.changes = AdapterChanges()
        self.base_dir = Path.cwd()
        self.state_file = settings.data_dir / "adapters.json"
        self.local = [b for b in backends.values() if b.takes_lora_files]
        #: The config overlaid by the changes: what requests read (recomputed on change).
        self.adapters: dict[str, AdapterConfig] = {}
        self.bindings: dict[str, str] = {}
        self._merge()

    def _merge(self) -> None:
        kept = {n: a for n, a in self._config.items() if n not in self.changes.removed}
        self.adapters = {**kept, **self.changes.put}
        merged = {**self._config_bindings, **self.changes.bindings}
        self.bindings = {t: a for t, a in merged.items() if a in self.adapters}

    async def start(self) -> None:
        """Load the saved API changes, then register every file adapter with the local
        models. A configured adapter that does not fit stops startup."""
        if self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            self.changes = AdapterChanges.from_json(saved, self._config, self._config_bindings)
            self._merge()
        for adapter in self.adapters.values():
            try:
                await self._register(adapter)
            except AdapterError as exc:
                raise ValueError(f"adapter '{adapter.name}': {exc}") from None

    def _path(self, adapter: AdapterConfig) -> Path | None:
        if not adapter.path:
            return None
        path = Path(adapter.path)
        return path if path.is_absolute() else self.base_dir / path

    async def _register(self, adapter: AdapterConfig) -> None:
        path = self._path(adapter)
        if path is None:
            return
        if not self.local:
            # No model to fit it to, but a file that is no LoRA at all is refused even so,
            # rather than accepted now and failing when a local model is configured.
            info = await asyncio.to_thread(inspect, path)
            if not info.fits:
                raise AdapterError(f"{path}: " + "; ".join(info.problems))
        for backend in self.local:
            await backend.register_adapter(adapter.name, path, adapter.scale)

    def for_tenant(self, tenant: str) -> AdapterConfig | None:
        name = self.bindings.get(tenant)
        return self.adapters.get(name) if name else None

    def local_adapter(self, tenant: str) -> str | None:
        """The LoRA a tenant's requests to a local model run with."""
        adapter = self.for_tenant(tenant)
        return adapter.name if adapter is not None and adapter.path else None

    def apply(self, ctx: RequestContext, backend: ChatBackend) -> str | None:
        """Fill the request's adapter fields for ``backend``; the name applied, if any."""
        adapter = self.for_tenant(ctx.tenant)
        if adapter is None:
            return None
        if backend.takes_lora_files:
            if adapter.path:
                ctx.adapter = adapter.name
                return adapter.name
            return None
        if adapter.upstream_model:
            ctx.upstream_model = adapter.upstream_model
            return adapter.name
        return None

    # -- changes through the API ----------------------------------------------------------

    async def put(self, adapter: AdapterConfig, tenants: list[str] | None) -> None:
        await self._register(adapter)  # raises AdapterError before anything changes
        self.changes.put[adapter.name] = adapter
        self.changes.removed.discard(adapter.name)
        for tenant in tenants or []:
            self.changes.bindings[tenant] = adapter.name
        self._merge()
        self._save()

    async def delete(self, name: str) -> None:
        for backend in self.local:
            await backend.unregister_adapter(name)
        self.changes.put.pop(name, None)
        if name in self._config:
            self.changes.removed.add(name)
        self.changes.bindings = {t: a for t, a in self.changes.bindings.items() if a != name}
        self._merge()
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.state_file, self.changes.to_json())

    def describe(self, adapter: AdapterConfig) -> dict[str, Any]:
        return {"object": "adapter", "name": adapter.name, "path": adapter.path,
                "scale": adapter.scale, "upstream_model": adapter.upstream_model,
                "tenants": sorted(t for t, a in self.bindings.items() if a == adapter.name)}
