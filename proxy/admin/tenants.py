"""The tenants registry: the config's tenants, overlaid by the admin API's changes, and
the key ring built from them.

``PUT /v1/tenants/{id}`` sets a tenant's keys (and, when given, its rate limit) without
a restart. Only what the API set is saved, in ``data_dir/tenants.json`` (keys in their
``sha256:`` form only), and it wins over the config file for those fields of that
tenant; every other field follows the config file, later edits included. A tenant
defined in the config cannot be deleted through the API (edit the file). Deleting a
tenant revokes its keys; its memories stay until purged.
"""

from __future__ import annotations

import json
from typing import Any

from memory.fsutil import write_json_atomic
from proxy.admin.keys import PREFIX, stored_digest
from proxy.auth import KeyRing
from proxy.errors import ConflictError
from proxy.settings import Settings, TenantConfig

#: Fields of a tenant the admin API may set.
API_FIELDS = ("api_keys", "rate_limit_rpm")


class TenantRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.configured = {t.id: t for t in settings.tenants}
        #: Per tenant, the fields the API set.
        self.managed: dict[str, dict[str, Any]] = {}
        self.state_file = settings.data_dir / "tenants.json"
        self.keys = self._keyring(self.tenants())

    def load(self) -> None:
        """Read the changes the API made before, and rebuild the key ring."""
        if self.state_file.exists():
            try:
                saved = json.loads(self.state_file.read_text())
                managed = {t["id"]: {k: v for k, v in t.items() if k in API_FIELDS}
                           for t in saved.get("tenants", [])}
                for tenant_id, fields in managed.items():
                    TenantConfig(id=tenant_id, **fields)  # still valid
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{self.state_file} is unreadable: {exc}") from None
            self.managed = managed
        self.keys = self._keyring(self.tenants())

    def tenants(self, managed: dict[str, dict[str, Any]] | None = None) -> dict[str, TenantConfig]:
        managed = self.managed if managed is None else managed
        merged = dict(self.configured)
        for tenant_id, fields in managed.items():
            base = self.configured.get(tenant_id)
            merged[tenant_id] = (base.model_copy(update=fields) if base is not None
                                 else TenantConfig(id=tenant_id, **fields))
        return merged

    def _keyring(self, tenants: dict[str, TenantConfig]) -> KeyRing:
        auth = self.settings.auth
        return KeyRing(enabled=auth.enabled, tenants=tenants.values(), admin_keys=auth.admin_keys,
                       default_rpm=auth.rate_limit_rpm)

    def put(self, tenant_id: str, fields: dict[str, Any]) -> TenantConfig:
        """Set a tenant's API fields to these (keys are stored hashed; a field not given
        follows the config, or the default); raises
        :class:`ConflictError` if a key belongs to someone else already."""
        fields = dict(fields)
        if "api_keys" in fields:
            fields["api_keys"] = [PREFIX + stored_digest(k) for k in fields["api_keys"]]
        managed = {**self.managed, tenant_id: fields}  # a PUT replaces what the API set before
        proposed = self.tenants(managed)
        _check_keys_unique(proposed, self.settings.auth.admin_keys)
        self._save(managed)
        self.managed = managed
        self.keys = self._keyring(proposed)
        return proposed[tenant_id]

    def delete(self, tenant_id: str) -> None:
        managed = {k: v for k, v in self.managed.items() if k != tenant_id}
        self._save(managed)
        self.managed = managed
        self.keys = self._keyring(self.tenants())

    def _save(self, managed: dict[str, dict[str, Any]]) -> None:
        write_json_atomic(self.state_file, {"tenants": [{"id": k, **v} for k, v in managed.items()]})

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
                raise ConflictError(f"That key already belongs to {owner[d]}.", code="key_in_use",
                                    param="api_keys")
            owner[d] = t.id
