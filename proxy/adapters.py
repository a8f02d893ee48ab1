"""Parametric memory in the app: which adapter each tenant's requests run with.

Adapters come from the config (``adapters:``, ``tenants[].adapter``) and from the
admin API (``PUT|DELETE /v1/adapters/{name}``, ``GET /v1/adapters``); what the API
changes is kept in ``data_dir/adapters.json`` and applied again at startup. A LoRA
file is checked against every local model when it is registered: one that does not
fit is refused with a 400, and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from memory.parametric import AdapterError, inspect
from proxy.auth import require_admin, require_key
from proxy.backends.base import ChatBackend, RequestContext
from proxy.backends.llamacpp import LlamaCppBackend
from proxy.errors import InvalidRequestError, NotFoundError
from proxy.protocol import MAX_ID_LENGTH, read_body
from proxy.settings import AdapterConfig, Settings

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class AdapterRegistry:
    def __init__(self, settings: Settings, backends: dict[str, ChatBackend]) -> None:
        self.adapters: dict[str, AdapterConfig] = {a.name: a for a in settings.adapters}
        self.bindings: dict[str, str] = {t.id: t.adapter for t in settings.tenants if t.adapter}
        self.base_dir = Path.cwd()
        self.state_file = settings.data_dir / "adapters.json"
        self.local = [b for b in backends.values() if isinstance(b, LlamaCppBackend)]
        for backend in self.local:
            backend.tenant_adapter = self.local_adapter

    async def start(self) -> None:
        """Load the saved API changes, then register every file adapter with the local
        models. A configured adapter that does not fit stops startup."""
        if self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            self.adapters.update({a["name"]: AdapterConfig.model_validate(a)
                                  for a in saved.get("adapters", [])})
            for name in saved.get("removed", []):
                self.adapters.pop(name, None)
            self.bindings.update(saved.get("bindings", {}))
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
        adapter = self.for_tenant(tenant)
        return adapter.name if adapter is not None and adapter.path else None

    def apply(self, ctx: RequestContext, backend: ChatBackend) -> str | None:
        """Fill the request's adapter fields for ``backend``; the name applied, if any."""
        adapter = self.for_tenant(ctx.tenant)
        if adapter is None:
            return None
        if isinstance(backend, LlamaCppBackend):
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
        self.adapters[adapter.name] = adapter
        for tenant in tenants or []:
            self.bindings[tenant] = adapter.name
        self._save()

    async def delete(self, name: str) -> None:
        for backend in self.local:
            await backend.unregister_adapter(name)
        self.adapters.pop(name)
        self.bindings = {t: a for t, a in self.bindings.items() if a != name}
        self._save(removed=name)

    def _save(self, removed: str | None = None) -> None:
        previous: list[str] = []
        if self.state_file.exists():
            previous = json.loads(self.state_file.read_text()).get("removed", [])
        gone = sorted({*previous, *([removed] if removed else [])} - set(self.adapters))
        body = {"adapters": [a.model_dump() for a in self.adapters.values()],
                "bindings": self.bindings, "removed": gone}
        tmp = self.state_file.with_suffix(".tmp")
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.state_file)

    def describe(self, adapter: AdapterConfig) -> dict[str, Any]:
        return {"object": "adapter", "name": adapter.name, "path": adapter.path,
                "scale": adapter.scale, "upstream_model": adapter.upstream_model,
                "tenants": sorted(t for t, a in self.bindings.items() if a == adapter.name)}


# -- routes ------------------------------------------------------------------------------

router = APIRouter(prefix="/v1/adapters", dependencies=[Depends(require_key)])


class PutAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str | None = Field(default=None, min_length=1, max_length=4096)
    scale: float = Field(default=1.0, ge=-100, le=100)
    upstream_model: str | None = Field(default=None, min_length=1, max_length=512)
    tenants: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]] | None = Field(
        default=None, max_length=1000)


def _registry(request: Request) -> AdapterRegistry:
    require_admin(request, "adapters")
    registry: AdapterRegistry = request.app.state.adapters
    return registry


@router.get("")
async def list_adapters(request: Request) -> dict[str, Any]:
    registry = _registry(request)
    data = [registry.describe(a) for a in sorted(registry.adapters.values(), key=lambda a: a.name)]
    return {"object": "list", "data": data, "has_more": False}


@router.put("/{name}")
async def put_adapter(name: str, request: Request) -> dict[str, Any]:
    registry = _registry(request)
    body = await read_body(request, PutAdapter)
    if not re.match(NAME_PATTERN, name):
        raise InvalidRequestError("Adapter names are 1-128 letters, digits, '.', '_' or '-'.",
                                  param="name")
    if not body.path and not body.upstream_model:
        raise InvalidRequestError("An adapter needs `path` (a LoRA GGUF) or `upstream_model`.",
                                  param="path")
    adapter = AdapterConfig(name=name, path=body.path, scale=body.scale,
                            upstream_model=body.upstream_model)
    try:
        await registry.put(adapter, body.tenants)
    except AdapterError as exc:
        raise InvalidRequestError(str(exc), param="path", code="invalid_adapter") from None
    return registry.describe(adapter)


@router.delete("/{name}")
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    registry = _registry(request)
    if name not in registry.adapters:
        raise NotFoundError(f"No adapter '{name}'.")
    await registry.delete(name)
    return {"object": "adapter.deleted", "name": name, "deleted": True}
