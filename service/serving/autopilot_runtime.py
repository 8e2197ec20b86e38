"""The autopilot's runtime loop: feed the controller what the server knows, publish what it decides.

An asyncio task on the serving process's event loop (started by the app's lifespan) ticks every
``tick_s``: it reads the recent latencies (:class:`~service.serving.autopilot.LatencyWindow`, fed by the HTTP
middleware), the batcher's queue depth and throughput, steps the :class:`~service.serving.autopilot.Controller`
and, when the budget moved, publishes the matching hull point in memory (:meth:`StateWriter.move_operating`:
no ``active.json`` write, no version bump; every response names the point that served it).

Configuration follows the store: the autopilot is on while ``active.json`` carries an ``"autopilot"`` key at
the version this process serves. That key is parsed once, where the state is adopted, into the snapshot
(:attr:`Snapshot.autopilot`); this loop reads the snapshot, never the file (one poller of ``active.json`` per
process: service/serving/follower.py; no file I/O on the event loop). Turning it on is one call,
:meth:`AutopilotRuntime.engage`: validate, write that key (:meth:`StateWriter.persist_autopilot`), engage with
the bounds computed once. Every other persisted switch writes ``active.json`` without it, which turns it off.
A restarted process, and every process that follows ``active.json``, picks the configuration up on its next
tick. Each process runs its own
controller on its own load signal: replicas behind a balancer see similar load, so they settle on similar
points; the moving point itself is never shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.earlyexit import Profile, select_by_target
from service.earlyexit.hull import TargetUnreachable
from service.serving.autopilot import AutopilotConfig, Clock, Controller, LatencyWindow, Signal, Tuning
from service.serving.ic_serving import mode_candidates
from service.store.bundles import BundleError

if TYPE_CHECKING:
    from service.serving.batcher import Batcher
    from service.serving.engine import Engine
    from service.serving.metrics import Metrics
    from service.serving.snapshot import Snapshot

log = logging.getLogger("classmeans.autopilot")


def bounds(candidates: list[Profile], min_accuracy: float | None) -> tuple[float, float]:
    """``(f_floor, f_ceiling)``: the cheapest point with accuracy ``>= min_accuracy`` (the cheapest point when
    None), and the costliest vertex that still meets it (the full network, unless it falls below the floor's
    accuracy). Every budget in between gives a point at least ``min_accuracy`` accurate (estimated). Raises
    :class:`TargetUnreachable` when no point meets ``min_accuracy``."""
    if min_accuracy is None:
        return min(p.flops_fraction for p in candidates), max(p.flops_fraction for p in candidates)
    floor = select_by_target(candidates, min_accuracy=min_accuracy).flops_fraction
    ceiling = max(p.flops_fraction for p in candidates if p.accuracy >= min_accuracy - 1e-12)
    return floor, max(floor, ceiling)


@dataclass
class _Engaged:
    config: AutopilotConfig
    controller: Controller
    version: int
    bundle: str


class AutopilotRuntime:
    """One per serving process: follows the persisted configuration and runs the controller."""

    def __init__(self, engine: Engine, batcher: Batcher, window: LatencyWindow, metrics: Metrics | None = None,
                 tuning: Tuning | None = None, tick_s: float = 0.25, window_s: float = 3.0, min_samples: int = 50,
                 clock: Clock = time.monotonic) -> None:
        self.engine, self.batcher, self.window, self.metrics = engine, batcher, window, metrics
        self.tuning = tuning or Tuning()
        self.tick_s, self.window_s, self.clock = tick_s, window_s, clock
        self.min_samples = min_samples  # fewer answers since the last move: no p99 (the max of a few is noise)
        self.state: _Engaged | None = None
        self.last_signal = Signal(None)
        self._seen_version: int | None = None
        self._samples = batcher.stats.samples
        self._samples_t = clock()
        self._rate = 0.0
        self.loop_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.follow()
        self._task = asyncio.create_task(self._loop(), name="classmeans-autopilot")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.tick_s)
            self.loop_lag_s = max(0.0, time.monotonic() - t0 - self.tick_s)  # a busy loop fires timers late
            try:
                self.tick()
            except Exception:  # the loop must survive anything; the operating point stays as it is
                log.exception("autopilot tick failed")

    # -- following the store --------------------------------------------------------------------------

    async def engage(self, config: AutopilotConfig) -> Snapshot:
        """Turn the autopilot on with ``config``, in one call: its bounds on the serving bundle (raises what
        :meth:`check` raises, changing nothing), the configuration persisted (in a worker thread: the store's
        lock and an fsync), then engaged with those bounds. Returns the snapshot serving afterwards."""
        found = self.check(config)
        new = await asyncio.to_thread(self.engine.writer.persist_autopilot, config)
        self.follow(bounds_of=(config, new.bundle_id, found))
        return self.engine.snapshot

    def follow(self, bounds_of: tuple[AutopilotConfig, str, tuple[float, float]] | None = None) -> None:
        """When the served version changed, engage or disengage as the configuration it carries says.
        ``bounds_of``: (configuration, bundle, bounds) already computed by :meth:`engage`."""
        snap = self.engine.snapshot
        if snap.version == self._seen_version:
            return
        self._seen_version = snap.version
        config = snap.autopilot
        if config is None:
            if snap.autopilot_error is not None:
                log.error("autopilot configuration in active.json (version %d) is unusable: %s", snap.version,
                          snap.autopilot_error)
                self._disengage(f"unusable configuration: {snap.autopilot_error}")
            else:
                self._disengage(f"version {snap.version} has no autopilot configuration")
            return
        known = bounds_of[2] if bounds_of is not None and bounds_of[:2] == (config, snap.bundle_id) else None
        try:
            self._engage(config, snap.version, known)
        except (ValueError, TargetUnreachable, BundleError) as exc:
            log.error("autopilot configuration in active.json (version %d) is unusable: %s", snap.version, exc)
            self._disengage(f"unusable configuration: {exc}")

    def check(self, config: AutopilotConfig) -> tuple[float, float]:
        """``(f_floor, f_ceiling)`` of ``config`` on the serving bundle; raises what :func:`bounds` and
        :func:`mode_candidates` raise (floor no point meets, mode not available now)."""
        snap = self.engine.snapshot
        return bounds(mode_candidates(snap.bundle, snap.ic, config.mode), config.min_accuracy)

    def _engage(self, config: AutopilotConfig, version: int, known: tuple[float, float] | None = None) -> None:
        snap = self.engine.snapshot
        old = self.state
        if old is not None and old.config == config and old.bundle == snap.bundle_id:
            old.version = version  # same configuration re-persisted or adopted from the store: keep the
            self._publish(old.controller.f, 0)  # controller's state, and its point (not the persisted one)
            return
        floor, ceiling = known if known is not None else self.check(config)
        ctl = Controller(config.target_s, floor, ceiling, snap.operating.flops_fraction, self.clock, self.tuning)
        self.state = _Engaged(config, ctl, version, snap.bundle_id)
        log.warning("autopilot on: p99 target %.1f ms, floor f=%.3f, ceiling f=%.3f, mode %s", config.target_ms,
                    floor, ceiling, config.mode)
        self._publish(ctl.f, 0)

    def _disengage(self, why: str) -> None:
        if self.state is not None:
            log.warning("autopilot off: %s", why)
        self.state = None
        if self.metrics is not None:
            self.metrics.autopilot_enabled.labels(self.metrics.model).set(0)

    # -- the loop's work ------------------------------------------------------------------------------

    def signal(self) -> Signal:
        """Recent p99 (answers started after the last move), expected queue wait, refusals."""
        now = self.clock()
        samples = self.batcher.stats.samples
        dt = now - self._samples_t
        if dt > 0:
            inst = (samples - self._samples) / dt
            self._rate = inst if self._rate == 0.0 else 0.5 * self._rate + 0.5 * inst
        self._samples, self._samples_t = samples, now
        since = self.state.controller.last_move_t if self.state is not None else -float("inf")
        w = self.window.stats(self.window_s, since=since, min_samples=self.min_samples)
        queued = self.batcher.queued_samples
        delay = queued / self._rate if self._rate > 0 else (self.window_s if queued else 0.0)
        return Signal(w.p99_s, max(delay, self.loop_lag_s), w.rejected, w.count)

    def tick(self) -> None:
        self.follow()
        self.last_signal = s = self.signal()
        if self.state is None:
            return
        d = self.state.controller.step(s)
        if d.direction:
            self._publish(d.f, d.direction)

    def _publish(self, f: float, direction: int) -> None:
        st = self.state
        assert st is not None
        new = self.engine.writer.move_operating(f, st.config.mode, st.version)
        if new is None:  # a persisted switch won the race; follow it on the next tick
            return
        m = self.metrics
        if m is not None:
            m.autopilot_enabled.labels(m.model).set(1)
            m.autopilot_flops_fraction.labels(m.model).set(new.operating.flops_fraction)
            if direction:
                m.autopilot_moves.labels(m.model, "down" if direction < 0 else "up").inc()

    # -- reporting ------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """For ``GET /profiles``: on or off, the target, the floor, the point held now, why, recent p99."""
        st, s = self.state, self.last_signal
        out: dict[str, Any] = {"enabled": st is not None,
                               "p99_ms": None if s.p99_s is None else 1000 * s.p99_s,
                               "queue_delay_ms": 1000 * s.queue_delay_s, "window_samples": s.samples}
        if st is None:
            return out
        c = st.controller
        op = self.engine.snapshot.operating
        out.update({"target_ms": st.config.target_ms, "min_accuracy": st.config.min_accuracy,
                    "mode": st.config.mode, "floor_flops_fraction": c.floor, "ceiling_flops_fraction": c.ceiling,
                    "budget_flops_fraction": c.f, "pressure": c.pressure, "moves": c.moves, "why": c.reason,
                    "operating": {"name": op.name, "a": op.a, "b": op.b, "lam": op.lam,
                                  "flops_fraction": op.flops_fraction, "accuracy": op.accuracy}})
        return out
