"""Prometheus metrics of one server instance (its own registry, so tests can run several apps)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """Requests by route and status, latency, tokens, tokens/s, batch sizes and queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "teacher_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "teacher_request_seconds", "request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.tokens = Counter("teacher_tokens", "tokens scored by the engine", registry=self.registry)
        self.tokens_per_second = Gauge(
            "teacher_tokens_per_second", "engine throughput of the last batch", registry=self.registry
        )
        self.batch_requests = Histogram(
            "teacher_batch_requests", "requests per dynamic batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "teacher_batch_tokens", "tokens per dynamic batch",
            buckets=(64, 256, 1024, 4096, 16384, 65536), registry=self.registry,
        )
        self.queue_requests = Gauge("teacher_queue_requests", "requests waiting for the engine", registry=self.registry)
        self.queue_tokens = Gauge("teacher_queue_tokens", "tokens waiting for the engine", registry=self.registry)
        self.abandoned = Counter(
            "teacher_requests_abandoned", "requests dropped uncomputed because their client disconnected",
            registry=self.registry,
        )
        self.expired = Counter(
            "teacher_requests_expired", "requests answered 503 after waiting longer than max_queue_wait_s",
            registry=self.registry,
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, requests: int, tokens: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)
        self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ObserveRequests:
    """ASGI middleware: count every HTTP request by route and status and time it.

    A plain ASGI middleware rather than ``@app.middleware("http")``: that one wraps ``receive``, and
    the routes need the server's own ``receive`` to notice a client that disconnected.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")  # FastAPI's router writes the matched route into the scope
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)
