"""Direct relay to an OpenAI-compatible upstream over pooled async HTTP.

The fast path for OpenAI, vLLM, Ollama's /v1, llama.cpp server and most hosted
providers: the body is forwarded with only ``model`` rewritten, the reply relayed.
litellm costs several milliseconds of CPU per call, so it stays off this path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from proxy.backends.base import ChatBackend, Completion
from proxy.errors import (
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    upstream_error_from_status,
)

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class OpenAIHTTPBackend(ChatBackend):
    kind = "direct"

    def __init__(
        self,
        *,
        upstream_model: str,
        api_base: str,
        api_key: str | None,
        timeout: float,
        connect_timeout: float,
        max_retries: int,
        max_connections: int = 200,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.upstream_model = upstream_model
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.max_retries = max_retries
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def close(self) -> None:
        await self._client.aclose()

    def _payload(self, body: dict[str, Any]) -> bytes:
        return json.dumps({**body, "model": self.upstream_model}).encode()

    async def _send(self, payload: bytes, *, stream: bool) -> httpx.Response:
        """Send with retries on connect errors and retryable statuses, before any reply."""
        attempt = 0
        while True:
            request = self._client.build_request("POST", self.url, content=payload)
            try:
                response = await self._client.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                if attempt < self.max_retries and isinstance(exc, httpx.ConnectTimeout):
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise UpstreamTimeoutError("upstream timed out") from None
            except httpx.TransportError as exc:
                if attempt < self.max_retries:
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise UpstreamUnavailableError(
                    f"upstream unreachable: {type(exc).__name__}"
                ) from None
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                await response.aclose()
                attempt += 1
                await asyncio.sleep(_backoff(attempt))
                continue
            return response

    async def complete(self, body: dict[str, Any]) -> Completion:
        response = await self._send(self._payload(body), stream=False)
        raw = response.content
        if response.status_code >= 300:
            raise upstream_error_from_status(response.status_code, raw)
        try:
            data = json.loads(raw)
        except ValueError:
            raise UpstreamError("upstream returned a malformed reply (not JSON)") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamError("upstream returned a malformed reply (no choices)")
        return Completion(data=data, raw=raw)

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        response = await self._send(self._payload(body), stream=True)
        try:
            if response.status_code >= 300:
                try:
                    payload = await response.aread()
                except httpx.HTTPError:
                    payload = b""
                raise upstream_error_from_status(response.status_code, payload)
            done = False
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    yield _parse_chunk(data)
            except httpx.TimeoutException:
                raise UpstreamTimeoutError("upstream timed out mid-stream") from None
            except httpx.TransportError as exc:
                raise UpstreamError(f"upstream stream broke: {type(exc).__name__}") from None
            if not done:
                raise UpstreamError("upstream stream ended before [DONE]")
        finally:
            await response.aclose()


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise UpstreamError("upstream sent a malformed stream chunk") from None
    if not isinstance(chunk, dict):
        raise UpstreamError("upstream sent a malformed stream chunk")
    if "error" in chunk and "choices" not in chunk:
        err = chunk["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise UpstreamError(f"upstream: {msg}")
    return chunk


def _backoff(attempt: int) -> float:
    return min(0.1 * 2 ** (attempt - 1), 2.0)
