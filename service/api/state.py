"""The per-app holder of everything the routes share. Routes read attributes; only the lifespan and the
engine's own swaps write them, so a request never sees a half-built state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from service.api.settings import Settings
from service.control.jobs import JobManager
from service.serving.autopilot import LatencyWindow
from service.serving.autopilot_runtime import AutopilotRuntime
from service.serving.batcher import Batcher
from service.serving.engine import Engine
from service.serving.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    jobs: JobManager
    engine: Engine | None = None
    batcher: Batcher | None = None
    follower: Any = None  # service.serving.follower.ActiveFollower once the engine is loaded
    token: str = ""
    ready: bool = False
    not_ready_reason: str = "the model is still loading"
    shutting_down: bool = False
    decode_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(2))
    latency: LatencyWindow = field(default_factory=LatencyWindow)  # recent inference latencies (autopilot)
    autopilot: AutopilotRuntime | None = None

    def mark_ready(self) -> None:
        self.ready = True
        self.not_ready_reason = ""
        self.metrics.up.labels(self.metrics.model).set(1)

    def begin_shutdown(self) -> None:
        """Readiness flips to 503 at once; in-flight requests still finish."""
        self.shutting_down = True
        self.ready = False
        self.not_ready_reason = "the server is shutting down"
        self.metrics.up.labels(self.metrics.model).set(0)
