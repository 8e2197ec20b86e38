"""Request metrics as a pure ASGI middleware: count, latency and in-flight gauge per route template."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.replica import add_worker_header
from service.serving.metrics import Metrics

# Probes and scrapes are neither "in flight" work nor admission-controlled.
UNCOUNTED_INFLIGHT = frozenset({"/metrics", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready"})


class MetricsMiddleware:
    """Observe every HTTP request: ``classmeans_requests_total``, latency, in-flight gauge; and name the
    process that answered (``X-Classmeans-Worker``).

    The endpoint label is the matched route's template (``/v2/models/{model_name}/infer``); a request that
    matched no route is labelled with its path only if the path is a known static route, else ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, static_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.static_paths = static_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["t0"] = start
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                add_worker_header(message)
            await send(message)

        m = self.metrics
        counted = scope["path"] not in UNCOUNTED_INFLIGHT
        if counted:
            m.inflight.labels(m.model).inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if counted:
                m.inflight.labels(m.model).dec()
            endpoint = self._endpoint(scope)
            m.requests.labels(m.model, endpoint, str(status)).inc()
            m.latency.labels(m.model, endpoint).observe(time.perf_counter() - start)

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        return scope["path"] if scope["path"] in self.static_paths else "unmatched"
