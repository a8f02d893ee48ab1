"""API keys -> tenant. Keys are held as SHA-256 digests; config may give either form.

A key in the config is either the key itself (``sk-...``) or ``sha256:<hex digest>``
of it, so config files need not hold secrets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.requests import Request

from proxy.errors import AuthenticationError
from proxy.settings import Settings

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool = False


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _stored_digest(configured: str) -> str:
    if configured.startswith("sha256:"):
        return configured[len("sha256:"):].lower()
    return _digest(configured)


class KeyRing:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth.enabled
        self._by_digest: dict[str, Principal] = {}
        for tenant in settings.tenants:
            for key in tenant.api_keys:
                self._by_digest[_stored_digest(key)] = Principal(tenant.id)
        for key in settings.auth.admin_keys:
            self._by_digest[_stored_digest(key)] = Principal(DEFAULT_TENANT, admin=True)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return Principal(DEFAULT_TENANT, admin=True)
        if not authorization:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("Authorization must be 'Bearer <key>'.")
        principal = self._by_digest.get(_digest(key.strip()))
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        return principal


def authenticate(request: Request) -> Principal:
    """The caller's principal (kept in the request state), or a 401."""
    keys: KeyRing = request.app.state.keys
    principal = keys.authenticate(request.headers.get("authorization"))
    request.scope["state"]["principal"] = principal
    return principal


async def require_key(request: Request) -> Principal:
    """Route dependency form of :func:`authenticate`."""
    return authenticate(request)
