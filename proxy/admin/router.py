"""The admin API: ``/v1/adapters`` and ``/v1/tenants`` (admin keys only), thin routes
over the registries in this package."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from memory.parametric import AdapterError
from proxy.admin.adapters import NAME_PATTERN, AdapterRegistry
from proxy.admin.keys import stored_digest
from proxy.admin.tenants import TenantRegistry
from proxy.auth import DEFAULT_TENANT, require_admin, require_key
from proxy.context import context
from proxy.errors import ConflictError, InvalidRequestError, NotFoundError
from proxy.protocol import MAX_ID_LENGTH, read_body
from proxy.settings import TENANT_ID_PATTERN, AdapterConfig, TenantConfig

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_key)])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PutAdapter(_Body):
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    scale: float = Field(default=1.0, ge=-100, le=100)
    upstream_model: str | None = Field(default=None, min_length=1, max_length=512)
    tenants: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]] | None = Field(
        default=None, max_length=1000)


class PutTenant(_Body):
    api_keys: list[str] = Field(min_length=1, max_length=100, description=(
        "Keys, each the key itself or `sha256:<hex>`; stored hashed."))
    rate_limit_rpm: int | None = Field(default=None, ge=1, le=10_000_000)


# -- adapters -------------------------------------------------------------------------------

def _adapters(request: Request) -> AdapterRegistry:
    require_admin(request, "adapters")
    return context(request).adapters


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    registry = _adapters(request)
    data = [registry.describe(a) for a in sorted(registry.adapters.values(), key=lambda a: a.name)]
    return {"object": "list", "data": data, "has_more": False}


@router.put("/v1/adapters/{name}")
async def put_adapter(name: str, request: Request) -> dict[str, Any]:
    registry = _adapters(request)
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


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    registry = _adapters(request)
    if name not in registry.adapters:
        raise NotFoundError(f"No adapter '{name}'.")
    await registry.delete(name)
    return {"object": "adapter.deleted", "name": name, "deleted": True}


# -- tenants --------------------------------------------------------------------------------

def _tenants(request: Request) -> TenantRegistry:
    require_admin(request, "tenants")
    return context(request).tenants


def _describe(request: Request, tenant: TenantConfig) -> dict[str, Any]:
    adapter = context(request).adapters.bindings.get(tenant.id)
    return context(request).tenants.describe(tenant, adapter)


def _known(registry: TenantRegistry, tenant_id: str) -> TenantConfig:
    tenant = registry.tenants().get(tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant '{tenant_id[:64]}'.", code="tenant_not_found")
    return tenant


@router.get("/v1/tenants")
async def list_tenants(request: Request) -> dict[str, Any]:
    registry = _tenants(request)
    data = [_describe(request, t) for t in sorted(registry.tenants().values(), key=lambda t: t.id)]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/v1/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, request: Request) -> dict[str, Any]:
    return _describe(request, _known(_tenants(request), tenant_id))


@router.put("/v1/tenants/{tenant_id}")
async def put_tenant(tenant_id: str, request: Request) -> dict[str, Any]:
    registry = _tenants(request)
    body = await read_body(request, PutTenant)
    if not re.match(TENANT_ID_PATTERN, tenant_id) or tenant_id == DEFAULT_TENANT:
        raise InvalidRequestError(
            "Tenant ids are 1-64 letters, digits, '.', '_' or '-' (and not 'default').",
            param="id")
    fields = body.model_dump(include=body.model_fields_set)
    try:
        TenantConfig(id=tenant_id, **fields)
        for key in body.api_keys:
            stored_digest(key)
    except ValueError as exc:
        raise InvalidRequestError(str(exc).splitlines()[-1].strip(), param="api_keys") from None
    tenant = registry.put(tenant_id, fields)
    log.info("tenant %s set through the API (%s keys)", tenant_id, len(tenant.api_keys))
    return _describe(request, tenant)


@router.delete("/v1/tenants/{tenant_id}")
async def delete_tenant(tenant_id: str, request: Request) -> dict[str, Any]:
    registry = _tenants(request)
    _known(registry, tenant_id)
    if tenant_id in registry.configured:
        raise ConflictError(f"Tenant '{tenant_id}' is defined in the config file; remove it there.",
                            code="tenant_in_config")
    registry.delete(tenant_id)
    log.info("tenant %s deleted through the API", tenant_id)
    return {"object": "tenant.deleted", "id": tenant_id, "deleted": True}
