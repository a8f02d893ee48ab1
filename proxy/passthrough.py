"""The passthrough: every ``/v1/*`` path the proxy does not serve itself (files, audio,
images, moderations, batches, ...) relayed unchanged to the configured ``passthrough``
upstream, or answered 404 with how to configure one.

It is the router's fallback, not a route, so it sees only requests that no route
matched, whatever order routes are mounted in: a path the proxy serves answered with
another method is still that route's 405. The proxy's own API namespaces (memories,
cubes, adapters, tenants, jobs) are never relayed: a mistyped path there is a 404 here,
not a request body leaving for the upstream.

The caller's key is checked as on every endpoint, then replaced by the upstream's key;
hop-by-hop headers and the proxy's own ``X-Memcube-*`` headers stay here. Bodies stream
both ways (aiohttp, no decompression): a multipart upload, an SSE stream or a binary
download is never held whole in memory, and reaches the other side byte for byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Router
from starlette.types import ASGIApp, Receive, Scope, Send
from yarl import URL

from proxy.auth import authenticate
from proxy.errors import (
    InvalidRequestError,
    NotFoundError,
    ProxyError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from proxy.settings import PassthroughSettings

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: The proxy's own API: no OpenAI path starts with these, so none is relayed.
OWN_NAMESPACES = frozenset({"memories", "cubes", "adapters", "tenants", "jobs"})
#: RFC 9110's hop-by-hop headers, and those each side sets for itself.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                         "proxy-authorization", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "expect"})
_NOT_FORWARDED = _HOP_BY_HOP | {"authorization"}
_NOT_RELAYED = _HOP_BY_HOP | {"server", "date"}  # uvicorn sends its own


@dataclass(frozen=True, slots=True)
class _Route:
    """What the metrics see as the route (the raw path would be a label per file id)."""

    path: str = "/v1/{path} (passthrough)"


class Passthrough:
    """The fallback of the app's router; ``close`` at shutdown."""

    def __init__(self, settings: PassthroughSettings | None, *, connect_timeout: float,
                 max_connections: int) -> None:
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.not_found: ASGIApp | None = None
        self._session: aiohttp.ClientSession | None = None
        self._auth: str | None = None
        if settings is not None and settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if key:
                self._auth = f"Bearer {key}"
            else:
                log.warning("passthrough.api_key_env: %s is not set; requests are relayed "
                            "without a key", settings.api_key_env)

    def install(self, router: Router) -> None:
        """Become ``router``'s fallback: what it runs when no route matched."""
        self.not_found = router.default
        router.default = self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            assert self.not_found is not None, "install() first"
            await self.not_found(scope, receive, send)
            return
        request = Request(scope, receive)
        authenticate(request)
        shown = path if len(path) <= 200 else f"{path[:200]}..."
        if self.settings is None:
            raise NotFoundError(
                f"Unknown path: {shown}. This proxy relays /v1 paths it does not serve to a "
                "passthrough upstream, and none is configured: set `passthrough.api_base` "
                "(e.g. https://api.openai.com/v1) and `passthrough.api_key_env` in the config, "
                "or MEMCUBE_PASSTHROUGH_API_BASE.")
        if path.split("/")[2] in OWN_NAMESPACES:
            raise NotFoundError(f"Unknown path: {shown}")
        if request.method not in METHODS:
            raise InvalidRequestError("Method Not Allowed", status=405)
        scope["route"] = _Route()  # relayed: counted as the passthrough, not unmatched
        response = await self._relay(request, self.settings)
        await response(scope, receive, send)

    def _target(self, scope: Scope, base: str) -> URL:
        """The upstream URL: the path after /v1 as the client wrote it (still
        percent-encoded), and its query string."""
        raw = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        tail = raw.decode("latin-1")[len("/v1"):]
        return URL(base.rstrip("/") + tail + (f"?{query.decode('latin-1')}" if query else ""),
                   encoded=True)

    def _headers(self, request: Request) -> list[tuple[str, str]]:
        out = [(k, v) for k, v in request.headers.items()
               if k not in _NOT_FORWARDED and not k.startswith("x-memcube-")]
        if self._auth:
            out.append(("authorization", self._auth))
        return out

    def _session_for(self, settings: PassthroughSettings) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
                auto_decompress=False,  # bytes as the upstream sent them, encoding and all
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                              sock_read=settings.timeout),
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
            )
        return self._session

    async def _relay(self, request: Request, settings: PassthroughSettings) -> StreamingResponse:
        has_body = ("transfer-encoding" in request.headers
                    or int(request.headers.get("content-length") or 0) > 0)
        failed: list[ProxyError] = []  # what stopped the client's body (413), if anything

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in request.stream():
                    if chunk:
                        yield chunk
            except ProxyError as exc:
                failed.append(exc)
                raise

        session = self._session_for(settings)
        try:
            upstream = await session.request(
                request.method, self._target(request.scope, settings.api_base),
                headers=self._headers(request), data=body() if has_body else None,
                allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeoutError("passthrough upstream timed out") from None
        except aiohttp.ClientError as exc:
            if failed:
                raise failed[0] from None
            raise UpstreamUnavailableError(
                f"passthrough upstream unreachable: {type(exc).__name__}") from None
        if failed:
            upstream.release()
            raise failed[0]
        return _streamed(upstream)


def _streamed(upstream: aiohttp.ClientResponse) -> StreamingResponse:
    async def content() -> AsyncIterator[bytes]:
        done = False
        try:
            async for block in upstream.content.iter_any():
                yield block
            done = True
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeoutError("passthrough upstream timed out mid-body") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"passthrough upstream broke off: {type(exc).__name__}") from None
        finally:
            # A body left unread (the client went away) closes its connection: the
            # upstream stops sending what nobody reads.
            if done:
                upstream.release()
            else:
                upstream.close()

    response = StreamingResponse(content(), status_code=upstream.status)
    response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in upstream.headers.items()
                            if k.lower() not in _NOT_RELAYED]
    return response
