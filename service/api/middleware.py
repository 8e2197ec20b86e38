"""Request metrics as a pure ASGI middleware: count, latency and in-flight gauge per route template.

The autopilot's latency window is fed here too, by the routes that mark themselves as inference
(:func:`inference_route` on the endpoint function): a new inference route joins the signal by saying so, not
by being added to a list of paths in this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.replica import add_worker_header
from service.serving.autopilot import LatencyWindow
from service.serving.metrics import Metrics

# Probes and scrapes are neither "in flight" work nor admission-controlled.
UNCOUNTED_INFLIGHT = frozenset({"/metrics", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready"})
INFERENCE_MARK = "__classmeans_inference__"
F = TypeVar("F", bound=Callable[..., Any])


def inference_route(endpoint: F) -> F:
    """Mark a route's endpoint as inference: its latencies feed the autopilot's window (2xx/3xx: answered;
    503/504: refused). Put it under the router's decorator."""
    setattr(endpoint, INFERENCE_MARK, True)
    return endpoint


def is_inference(scope: Scope) -> bool:
    """Whether the matched route (``scope["route"]``, set by the router or the lean lane) is marked inference."""
    return bool(getattr(getattr(scope.get("route"), "endpoint", None), INFERENCE_MARK, False))


class MetricsMiddleware:
    """Observe every HTTP request: ``classmeans_requests_total``, latency, in-flight gauge; and name the
    process that answered (``X-Classmeans-Worker``).

    The endpoint label is the matched route's template (``/v2/models/{model_name}/infer``); a request that
    matched no route is labelled with its path only if the path is a known static route, else ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, static_paths: frozenset[str] = frozenset(),
                 window: LatencyWindow | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.static_paths = static_paths
        self.window = window

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
            seconds = time.perf_counter() - start
            m.latency.labels(m.model, endpoint).observe(seconds)
            if self.window is not None and (status < 400 or status in (503, 504)) and is_inference(scope):
                self.window.record(seconds, ok=status < 400)

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        return scope["path"] if scope["path"] in self.static_paths else "unmatched"
