"""Request ids, logging and Prometheus metrics, applied by one pure-ASGI middleware.

Pure ASGI (not BaseHTTPMiddleware) because it sits on every request's hot path and
must see a stream's last byte to time it. It also enforces the body size limit and
the length of the headers that carry ids (a 100 KB user id is a 400, not a stored key).
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import headers
from proxy.backends.base import ChatBackend
from proxy.errors import InvalidRequestError, PayloadTooLargeError, ProxyError, error_response
from proxy.protocol import MAX_ID_LENGTH
from proxy.state import RequestState, attach

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("proxy.access")

# Headers that name a user or session, as the chat path and memory API read them.
_ID_HEADERS = {name.encode(): shown for name, shown in headers.ID_HEADERS.items()}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60, 120)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for noisy in ("httpx", "httpcore", "LiteLLM", "litellm"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Metrics:
    """One registry per app, so two apps in one process (tests) never share counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "model", "status"]
        self.requests = Counter("memcube_requests_total", "HTTP requests answered.",
                                labels, registry=self.registry)
        self.errors = Counter("memcube_request_errors_total",
                              "Requests that failed, mid-stream failures included.",
                              [*labels, "type"], registry=self.registry)
        self.latency = Histogram("memcube_request_duration_seconds",
                                 "Time from request to last byte, seconds.",
                                 ["route", "model"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
        self.in_flight = Gauge("memcube_requests_in_flight", "Requests being served.",
                               registry=self.registry)
        self.degraded = Counter("memcube_degraded_requests_total",
                                "Requests answered without part of memory (X-Memcube-Degraded).",
                                ["component"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_activation(self, backends: Mapping[str, ChatBackend]) -> None:
        """Export the activation memory of every backend that keeps it (the local one)."""
        self.registry.register(ActivationCollector(backends))

    def watch_memory(self, service: Callable[[], Any]) -> None:
        """Export the write-back outbox and the store's health (``service()``: the memory
        service, or None while there is none)."""
        self.registry.register(MemoryCollector(service))

    def observe(self, state: RequestState, route: str, status: int, seconds: float) -> None:
        for component in state.degraded:
            self.degraded.labels(component).inc()
        model = state.model
        code = str(status)
        self.requests.labels(route, model, code).inc()
        self.latency.labels(route, model).observe(seconds)
        error_type = state.error_type
        if status >= 400 or error_type:
            self.errors.labels(route, model, code, error_type or "error").inc()


class ProxyMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        state = RequestState(request_id=rid)
        attach(scope, state)
        header_value = rid.encode()
        start = time.perf_counter()
        status = 500
        finished = False
        limit = self.max_body_bytes
        self.metrics.in_flight.inc()

        def record() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            seconds = time.perf_counter() - start
            route = _route_label(scope)
            self.metrics.observe(state, route, status, seconds)
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                            seconds * 1000)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (headers.REQUEST_ID.encode(), header_value)]
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # Recorded before the last byte leaves: a client that reads /metrics or
                # the log right after its response must find this request there.
                record()
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(_too_large(limit))
            return message

        try:
            refused = _refused(scope, limit)
            if refused is not None:
                state.error_type = refused.type
                await error_response(refused)(scope, receive, send_wrapper)
                return
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            record()
            self.metrics.in_flight.dec()
            request_id_var.reset(token)


def _route_label(scope: Scope) -> str:
    """The route template, never the raw path of an unmatched request (label cardinality)."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        return str(route)
    # Plain Starlette routes (the chat hot path) set only the endpoint; they have no
    # path parameters, so the path is the template.
    return str(scope["path"]) if scope.get("endpoint") else "unmatched"


def _refused(scope: Scope, limit: int) -> ProxyError | None:
    """What the headers alone show to be wrong: a declared body over the limit, or an
    id header too long to be an id."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                continue  # the server itself refuses a malformed length
            if declared > limit:
                return PayloadTooLargeError(_too_large(limit))
        elif name in _ID_HEADERS and len(value) > MAX_ID_LENGTH:
            header = _ID_HEADERS[name]
            return InvalidRequestError(
                f"The {header} header is {len(value)} characters long; at most "
                f"{MAX_ID_LENGTH} are allowed.", param=header.lower(), code="invalid_header")
    return None


def _too_large(limit: int) -> str:
    return f"Request body is larger than the limit of {limit} bytes."


class ActivationCollector(Collector):
    """Activation memory figures, read from the backends at scrape time: hits and misses,
    background rebuilds, states evicted and found corrupt, bytes per tier, and the time
    restores and builds took."""

    def __init__(self, backends: Mapping[str, ChatBackend]) -> None:
        self.backends = backends

    def collect(self) -> Iterator[Any]:
        hits = CounterMetricFamily("memcube_activation_hits", "Prefix states restored.",
                                   labels=["model", "tier"])
        misses = CounterMetricFamily("memcube_activation_misses",
                                     "Prefix states computed at request time.", labels=["model"])
        rebuilds = CounterMetricFamily("memcube_activation_rebuilds",
                                       "Prefix states rebuilt in the background after a block "
                                       "changed.", labels=["model"])
        evictions = CounterMetricFamily("memcube_activation_evictions",
                                        "States evicted to stay within a tier's bytes.",
                                        labels=["model", "tier"])
        corrupt = CounterMetricFamily("memcube_activation_corrupt",
                                      "State files found corrupt or truncated (deleted, "
                                      "rebuilt).", labels=["model"])
        size = GaugeMetricFamily("memcube_activation_bytes", "Bytes of saved states per tier.",
                                 labels=["model", "tier"])
        restore = SummaryMetricFamily("memcube_activation_restore_seconds",
                                      "Time to restore a prefix state.", labels=["model"])
        build = SummaryMetricFamily("memcube_activation_build_seconds",
                                    "Time to compute and save a prefix state.", labels=["model"])
        for name, backend in self.backends.items():
            states, act = backend.states, backend.activation
            if states is None or act is None:
                continue
            stats = states.stats
            for tier in ("ram", "disk"):
                hits.add_metric([name, tier], stats.hits[tier])
                evictions.add_metric([name, tier], stats.evictions[tier])
            misses.add_metric([name], act.misses)
            rebuilds.add_metric([name], act.rebuilds)
            corrupt.add_metric([name], stats.corrupt)
            size.add_metric([name, "ram"], states.ram_used())
            size.add_metric([name, "disk"], states.disk_used())
            restore.add_metric([name], act.restore_seconds.count, act.restore_seconds.seconds)
            build.add_metric([name], act.build_seconds.count, act.build_seconds.seconds)
        yield from (hits, misses, rebuilds, evictions, corrupt, size, restore, build)
        loads = CounterMetricFamily("memcube_adapter_loads", "LoRA adapters loaded into a "
                                    "local model.", labels=["model"])
        dropped = CounterMetricFamily("memcube_adapter_evictions", "LoRA adapters let go by the "
                                      "loaded-adapter LRU.", labels=["model"])
        uses = CounterMetricFamily("memcube_adapter_requests", "Local requests by adapter "
                                   "('' = none).", labels=["model", "adapter"])
        for name, backend in self.backends.items():
            used = backend.adapter_stats
            if used is None:
                continue
            loads.add_metric([name], used.loads)
            dropped.add_metric([name], used.evictions)
            for adapter, count in sorted(used.requests.items()):
                uses.add_metric([name, adapter], count)
        yield from (loads, dropped, uses)


class MemoryCollector(Collector):
    """Write-back backlog and dead letters, and whether the store is reachable, read at
    scrape time (two small SQLite counts)."""

    def __init__(self, service: Callable[[], Any]) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        service = self.service()
        if service is None:
            return
        try:
            pending, dead = service.outbox.pending_count(), service.outbox.dead_count()
        except Exception:  # closed while shutting down: skip, never fail the scrape
            return
        health = service.health()
        yield GaugeMetricFamily("memcube_outbox_pending",
                                "Exchanges acknowledged but not yet written back.", value=pending)
        yield GaugeMetricFamily("memcube_outbox_dead",
                                "Exchanges that failed every retry (dead letters).", value=dead)
        yield GaugeMetricFamily("memcube_memory_store_up",
                                "1 while the memory store answers, 0 during an outage.",
                                value=1 if health["store"] == "ok" else 0)
