"""Who is calling: API key -> tenant (or admin), the tenant an admin acts for, and
per-tenant rate limits.

Trust model: a tenant's key is a server-side secret of the tenant's application. The
application asserts which of its end users a request is for (``X-Memcube-User`` or the
body's ``user``), and the proxy believes it: isolation between tenants is enforced by
the key, isolation between one tenant's users by that tenant's application.

Keys are held only as SHA-256 digests. The digest of the presented key is compared
with every stored digest by :func:`hmac.compare_digest`, without stopping at a match,
so the time taken does not depend on how much of a key is right.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import headers
from proxy.admin.keys import digest, stored_digest
from proxy.errors import AuthenticationError, NotFoundError, PermissionDeniedError, RateLimitError
from proxy.settings import TenantConfig
from proxy.state import request_state

if TYPE_CHECKING:
    from proxy.context import AppContext

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool = False


class KeyRing:
    """The keys of the configured tenants and admins; immutable, rebuilt on change."""

    def __init__(self, *, enabled: bool, tenants: Iterable[TenantConfig],
                 admin_keys: Iterable[str], default_rpm: int | None = None) -> None:
        self.enabled = enabled
        self.tenants = {t.id: t for t in tenants}
        self._entries: list[tuple[bytes, Principal]] = []
        for tenant in self.tenants.values():
            for key in tenant.api_keys:
                self._entries.append((bytes.fromhex(stored_digest(key)), Principal(tenant.id)))
        for key in admin_keys:
            self._entries.append((bytes.fromhex(stored_digest(key)),
                                  Principal(DEFAULT_TENANT, admin=True)))
        self.limits = {t.id: rpm for t in self.tenants.values()
                       if (rpm := t.rate_limit_rpm or default_rpm)}
        if DEFAULT_TENANT not in self.limits and default_rpm:
            self.limits[DEFAULT_TENANT] = default_rpm

    def identify(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return Principal(DEFAULT_TENANT, admin=True)
        if not authorization:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("Authorization must be 'Bearer <key>'.")
        presented = bytes.fromhex(digest(key.strip()))
        found: Principal | None = None
        for stored, principal in self._entries:  # no early exit: constant time per key count
            if hmac.compare_digest(stored, presented):
                found = principal
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found

    def acting_as(self, principal: Principal, requested: str | None) -> Principal:
        """An admin may act for any known tenant (``X-Memcube-Tenant``); a tenant only
        for itself."""
        if requested is None or requested == principal.tenant:
            return principal
        if not principal.admin:
            raise PermissionDeniedError(
                "Only admin keys may act for another tenant (X-Memcube-Tenant).")
        if requested != DEFAULT_TENANT and requested not in self.tenants:
            raise NotFoundError(f"No tenant '{requested[:64]}'.", code="tenant_not_found")
        return Principal(requested, admin=True)


class RateLimiter:
    """A token bucket per tenant: ``rpm`` requests a minute, refilled continuously, and
    bursts of up to a minute's worth. Per process: replicas each allow the full rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)

    def wait_needed(self, tenant: str, rpm: int) -> float:
        """0 and one request taken if the tenant may go on now, else the seconds until
        it may (nothing taken)."""
        now = self._clock()
        tokens, then = self._buckets.get(tenant, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - then) * rpm / 60.0)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (1.0 - tokens) * 60.0 / rpm


def authenticate(request: Request) -> Principal:
    """The caller's principal (kept in the request state), or a 401, 403, 404 or 429."""
    ctx: AppContext = request.app.state.context
    keys = ctx.tenants.keys
    principal = keys.identify(request.headers.get("authorization"))
    principal = keys.acting_as(principal, request.headers.get(headers.TENANT))
    rpm = None if principal.admin else keys.limits.get(principal.tenant)
    if rpm:
        wait = ctx.rate_limiter.wait_needed(principal.tenant, rpm)
        if wait:
            raise RateLimitError(
                f"Rate limit of {rpm} requests per minute reached for tenant "
                f"'{principal.tenant}'; retry after {wait:.1f} s.",
                retry_after=max(1, math.ceil(wait)))
    request_state(request).principal = principal
    return principal


def json_post_route(path: str, handle: Callable[[Request], Awaitable[Response]]) -> Route:
    """``POST path`` with a JSON body: authenticate, check the body's type, ``handle``.

    A plain Starlette route: FastAPI's dependency resolution cost more per request than
    the rest of the relay (bench/overhead.py), so the endpoints that relay use these."""
    from proxy.protocol import check_json_content_type

    async def endpoint(request: Request) -> Response:
        authenticate(request)
        check_json_content_type(request.headers.get("content-type"))
        return await handle(request)

    return Route(path, endpoint, methods=["POST"])


def principal_of(request: Request) -> Principal:
    """The principal :func:`authenticate` found for this request."""
    principal = request_state(request).principal
    assert principal is not None, "the route did not authenticate"
    return principal


def require_admin(request: Request, what: str) -> Principal:
    """The caller's principal if it holds an admin key, else a 403 naming ``what``."""
    principal = principal_of(request)
    if not principal.admin:
        raise PermissionDeniedError(f"Only admin keys may manage {what}.")
    return principal


async def require_key(request: Request) -> Principal:
    """Route dependency form of :func:`authenticate`."""
    return authenticate(request)
