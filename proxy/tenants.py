"""Tenants: from the config (``tenants:``) and from the admin API.

``GET /v1/tenants``, ``GET|PUT|DELETE /v1/tenants/{id}`` (admin keys only) add tenants,
replace their keys and set their rate limits without a restart. What the API sets is
kept in ``data_dir/tenants.json``, keys in their ``sha256:`` form only, and wins over
the config file for that tenant; a tenant defined in the config cannot be deleted
through the API (edit the file). Deleting a tenant revokes its keys; its memories stay
until purged (``POST /v1/memories/purge`` with ``X-Memcube-Tenant``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from proxy.auth import DEFAULT_TENANT, KeyRing, require_admin, require_key
from proxy.errors import InvalidRequestError, NotFoundError, ProxyError
from proxy.keys import PREFIX, stored_digest
from proxy.protocol import read_body
from proxy.settings import TENANT_ID_PATTERN, Settings, TenantConfig

log = logging.getLogger(__name__)


class TenantRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.configured = {t.id: t for t in settings.tenants}
        self.managed: dict[str, TenantConfig] = {}
        self.state_file = settings.data_dir / "tenants.json"

    def load(self) -> KeyRing:
        """Read the tenants the API set before; the key ring for all of them."""
        if self.state_file.exists():
            try:
                saved = json.loads(self.state_file.read_text())
                self.managed = {t["id"]: TenantConfig.model_validate(t)
                                for t in saved.get("tenants", [])}
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{self.state_file} is unreadable: {exc}") from None
        return self.keyring()

    def tenants(self) -> dict[str, TenantConfig]:
        return {**self.configured, **self.managed}

    def keyring(self, tenants: dict[str, TenantConfig] | None = None) -> KeyRing:
        auth = self.settings.auth
        return KeyRing(enabled=auth.enabled, tenants=(tenants or self.tenants()).values(),
                       admin_keys=auth.admin_keys, default_rpm=auth.rate_limit_rpm)

    def put(self, tenant: TenantConfig) -> KeyRing:
        hashed = tenant.model_copy(update={"api_keys": [
            PREFIX + stored_digest(k) for k in tenant.api_keys]})
        proposed = {**self.tenants(), tenant.id: hashed}
        _check_keys_unique(proposed, self.settings.auth.admin_keys)
        managed = {**self.managed, tenant.id: hashed}
        self._save(managed)
        self.managed = managed
        return self.keyring()

    def delete(self, tenant_id: str) -> KeyRing:
        managed = {k: v for k, v in self.managed.items() if k != tenant_id}
        self._save(managed)
        self.managed = managed
        return self.keyring()

    def _save(self, managed: dict[str, TenantConfig]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        body = {"tenants": [t.model_dump(exclude_none=True) for t in managed.values()]}
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def describe(self, tenant: TenantConfig, adapter: str | None) -> dict[str, Any]:
        return {"object": "tenant", "id": tenant.id, "key_count": len(tenant.api_keys),
                "rate_limit_rpm": tenant.rate_limit_rpm or self.settings.auth.rate_limit_rpm,
                "adapter": adapter,
                "source": "api" if tenant.id in self.managed else "config"}


def _check_keys_unique(tenants: dict[str, TenantConfig], admin_keys: list[str]) -> None:
    owner: dict[str, str] = {stored_digest(k): "an admin" for k in admin_keys}
    for t in tenants.values():
        for key in t.api_keys:
            d = stored_digest(key)
            if owner.get(d, t.id) != t.id:
                raise ProxyError(f"That key already belongs to {owner[d]}.", status=409,
                                 type="conflict_error", code="key_in_use", param="api_keys")
            owner[d] = t.id


# -- routes ------------------------------------------------------------------------------

router = APIRouter(prefix="/v1/tenants", dependencies=[Depends(require_key)])


class PutTenant(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    api_keys: list[str] = Field(min_length=1, max_length=100, description=(
        "Keys, each the key itself or `sha256:<hex>`; stored hashed."))
    rate_limit_rpm: int | None = Field(default=None, ge=1, le=10_000_000)


def _registry(request: Request) -> TenantRegistry:
    require_admin(request, "tenants")
    registry: TenantRegistry = request.app.state.tenants
    return registry


def _adapter(request: Request, tenant_id: str) -> str | None:
    adapters = getattr(request.app.state, "adapters", None)
    return adapters.bindings.get(tenant_id) if adapters is not None else None


def _known(registry: TenantRegistry, tenant_id: str) -> TenantConfig:
    tenant = registry.tenants().get(tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant '{tenant_id[:64]}'.", code="tenant_not_found")
    return tenant


@router.get("")
async def list_tenants(request: Request) -> dict[str, Any]:
    registry = _registry(request)
    data = [registry.describe(t, _adapter(request, t.id))
            for t in sorted(registry.tenants().values(), key=lambda t: t.id)]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{tenant_id}")
async def get_tenant(tenant_id: str, request: Request) -> dict[str, Any]:
    registry = _registry(request)
    return registry.describe(_known(registry, tenant_id), _adapter(request, tenant_id))


@router.put("/{tenant_id}")
async def put_tenant(tenant_id: str, request: Request) -> dict[str, Any]:
    registry = _registry(request)
    body = await read_body(request, PutTenant)
    if not re.match(TENANT_ID_PATTERN, tenant_id) or tenant_id == DEFAULT_TENANT:
        raise InvalidRequestError(
            "Tenant ids are 1-64 letters, digits, '.', '_' or '-' (and not 'default').",
            param="id")
    try:
        tenant = TenantConfig(id=tenant_id, api_keys=body.api_keys,
                              rate_limit_rpm=body.rate_limit_rpm)
        for key in tenant.api_keys:
            stored_digest(key)
    except ValueError as exc:
        raise InvalidRequestError(str(exc).splitlines()[-1].strip(), param="api_keys") from None
    request.app.state.keys = registry.put(tenant)
    log.info("tenant %s set through the API (%s keys)", tenant_id, len(tenant.api_keys))
    return registry.describe(registry.tenants()[tenant_id], _adapter(request, tenant_id))


@router.delete("/{tenant_id}")
async def delete_tenant(tenant_id: str, request: Request) -> dict[str, Any]:
    registry = _registry(request)
    _known(registry, tenant_id)
    if tenant_id in registry.configured:
        raise ProxyError(f"Tenant '{tenant_id}' is defined in the config file; remove it there.",
                         status=409, type="conflict_error", code="tenant_in_config")
    request.app.state.keys = registry.delete(tenant_id)
    log.info("tenant %s deleted through the API", tenant_id)
    return {"object": "tenant.deleted", "id": tenant_id, "deleted": True}
