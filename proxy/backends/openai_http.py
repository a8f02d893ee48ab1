"""Direct relay to an OpenAI-compatible upstream over pooled async HTTP (aiohttp).

The fast path for OpenAI, vLLM, Ollama's /v1, llama.cpp server and most hosted
providers: the body is forwarded with only ``model`` rewritten, the reply relayed.
litellm costs several milliseconds of CPU per call, so it stays off this path.

aiohttp rather than httpx: under 20 concurrent requests httpcore's pool spent
more CPU choosing a connection than the rest of the proxy did serving the request
(bench/overhead.py), and aiohttp is already installed as a dependency of litellm.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from proxy.backends.base import ChatBackend, Completion, RequestContext, StreamEvent
from proxy.errors import (
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    upstream_error_from_status,
)

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class OpenAIHTTPBackend(ChatBackend):
    """An OpenAI-protocol upstream relayed over pooled HTTP, only ``model`` rewritten."""

    serves_embeddings = True
    serves_responses = True

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
    ) -> None:
        self.upstream_model = upstream_model
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.embeddings_url = api_base.rstrip("/") + "/embeddings"
        self.completions_url = api_base.rstrip("/") + "/completions"
        self.responses_url = api_base.rstrip("/") + "/responses"
        self.max_retries = max_retries
        self.max_connections = max_connections
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        # Non-stream: the whole reply within `timeout`. Stream: no more than `timeout`
        # between two reads, however long the stream runs.
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
            headers=self._headers,
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _payload(self, body: dict[str, Any], ctx: RequestContext | None = None) -> bytes:
        model = self.upstream_model
        if ctx is not None and ctx.upstream_model:  # the tenant's adapter, as a model name
            provider, _, name = ctx.upstream_model.partition("/")
            model = name if name and provider in ("openai", "hosted_vllm") else ctx.upstream_model
        return json.dumps({**body, "model": model}).encode()

    async def _send(self, payload: bytes, *, stream: bool,
                    url: str | None = None) -> aiohttp.ClientResponse:
        """Send with retries on connect errors and retryable statuses, before any reply."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        timeout = self._stream_timeout if stream else self._timeout
        attempt = 0
        while True:
            try:
                response = await self._session.post(url or self.url, data=payload,
                                                    timeout=timeout)
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise UpstreamTimeoutError("upstream timed out") from None
            except aiohttp.ClientError as exc:
                if attempt < self.max_retries:
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise UpstreamUnavailableError(
                    f"upstream unreachable: {type(exc).__name__}"
                ) from None
            if response.status in _RETRY_STATUSES and attempt < self.max_retries:
                response.release()
                attempt += 1
                await asyncio.sleep(_backoff(attempt))
                continue
            return response

    async def _open_stream(self, payload: bytes, url: str) -> aiohttp.ClientResponse:
        """A stream's response, once it answered with success (else its error)."""
        response = await self._send(payload, stream=True, url=url)
        if response.status >= 300:
            try:
                reply = await response.read()
            except aiohttp.ClientError:
                reply = b""
            finally:
                response.release()
            raise upstream_error_from_status(response.status, reply)
        return response

    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        return await self._reply(self._payload(body, ctx), self.url, "choices")

    async def text_complete(self, body: dict[str, Any],
                            ctx: RequestContext | None = None) -> Completion:
        return await self._reply(self._payload(body, ctx), self.completions_url, "choices")

    async def embeddings(self, body: dict[str, Any]) -> Completion:
        # The configured model, never a tenant's adapter: adapters name chat models.
        payload = json.dumps({**body, "model": self.upstream_model}).encode()
        return await self._reply(payload, self.embeddings_url, "data")

    async def native_responses(self, body: dict[str, Any],
                               ctx: RequestContext | None = None) -> Completion:
        return await self._reply(self._payload(body, ctx), self.responses_url, "output")

    async def _reply(self, payload: bytes, url: str, listing: str) -> Completion:
        """A non-stream reply, relayed as its bytes; ``listing``: the list it must hold."""
        response = await self._send(payload, stream=False, url=url)
        try:
            raw = await response.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeoutError("upstream timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream reply broke: {type(exc).__name__}") from None
        finally:
            response.release()
        if response.status >= 300:
            raise upstream_error_from_status(response.status, raw)
        try:
            data = json.loads(raw)
        except ValueError:
            raise UpstreamError("upstream returned a malformed reply (not JSON)") from None
        if not isinstance(data, dict) or not isinstance(data.get(listing), list):
            raise UpstreamError(f"upstream returned a malformed reply (no {listing})")
        return Completion(data=data, raw=raw)

    async def stream(self, body: dict[str, Any],
                     ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        events = self.stream_events(body, ctx)
        try:
            async for group in events:
                for event in group:
                    yield event.data
        finally:
            await events.aclose()

    def stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        return self._stream_events(self._payload(body, ctx), self.url)

    def text_stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        return self._stream_events(self._payload(body, ctx), self.completions_url)

    async def _stream_events(self, payload: bytes,
                             url: str) -> AsyncGenerator[list[StreamEvent], None]:
        response = await self._open_stream(payload, url)
        try:
            done = False
            pending = b""
            try:
                # Whatever one read brings (often several events) is relayed as one group.
                async for block in response.content.iter_any():
                    lines = (pending + block).split(b"\n")
                    pending = lines.pop()
                    group: list[StreamEvent] = []
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        group.append(StreamEvent(_parse_chunk(data), data))
                    if group:
                        yield group
                    if done:
                        break
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise UpstreamTimeoutError("upstream timed out mid-stream") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"upstream stream broke: {type(exc).__name__}") from None
            if not done:
                raise UpstreamError("upstream stream ended before [DONE]")
        finally:
            response.release()

    # -- the Responses API, relayed as it is (models set to `responses: native`) ----------

    async def native_responses_stream(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        response = await self._open_stream(self._payload(body, ctx), self.responses_url)
        try:
            pending = b""
            finished = False
            try:
                async for block in response.content.iter_any():
                    frames = (pending + block).split(b"\n\n")
                    pending = frames.pop()
                    group = []
                    for raw in frames:
                        event = _parse_event(raw)
                        if event is not None:
                            group.append(StreamEvent(event, raw + b"\n\n"))
                            finished = finished or event.get("type") in _LAST_EVENTS
                    if group:
                        yield group
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise UpstreamTimeoutError("upstream timed out mid-stream") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"upstream stream broke: {type(exc).__name__}") from None
            if not finished:
                raise UpstreamError("upstream stream ended before the response finished")
        finally:
            response.release()


#: The events a Responses stream ends with.
_LAST_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed",
                          "error"})


def _parse_event(frame: bytes) -> dict[str, Any] | None:
    """A Responses stream frame's event (its ``data:`` line), None for comments."""
    for line in frame.split(b"\n"):
        if line.startswith(b"data:"):
            if line[5:].strip() == b"[DONE]":  # some relays end a Responses stream so
                return None
            try:
                event = json.loads(line[5:])
            except ValueError:
                raise UpstreamError("upstream sent a malformed stream event") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise UpstreamError("upstream sent a malformed stream event")
            return event
    return None


def _parse_chunk(data: bytes) -> dict[str, Any]:
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
