"""The pull API's Prometheus metrics, served on its own ``/metrics``.

Labels are the route's template (``/v1/users/{user_id}/recommendations``), never the
path a client sent: user ids are personal data and unbounded in number.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Seconds; the target (p99 < 20 ms) falls between two bounds.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
UNMATCHED = "<unmatched>"


class ApiMetrics:
    """Request latency and status codes per route, answers and batches of the service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "shoprec_api_request_seconds",
            "Time from a request's arrival to its response's last byte, per route and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "shoprec_api_responses",
            "Responses per route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.answers = Counter(
            "shoprec_api_answers",
            "Lists answered, by kind (user, similar) and whether they were degraded.",
            ["kind", "degraded"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "shoprec_api_batch_size",
            "Requests answered together by one ranker call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.stages = Histogram(
            "shoprec_api_stage_seconds",
            "Seconds per stage of a request: queue (waiting for its batch), then per batch "
            "queries (BERT), state (Redis), context (Redis, asks that change it), rank "
            "(request, ranker call, explanations).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.latency.labels(route, method).observe(seconds)
        self.responses.labels(route, method, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TimingMiddleware:
    """Pure ASGI: times every HTTP request and counts its status under its route."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server sends if the app fails before answering

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            # The router put the matched route in the scope; its template is the label.
            route = getattr(scope.get("route"), "path", UNMATCHED)
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - start)
