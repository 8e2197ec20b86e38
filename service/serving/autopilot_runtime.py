"""The autopilot's runtime loop: feed the controller what the server knows, publish what it decides.

An asyncio task on the serving process's event loop (started by the app's lifespan) ticks every
``tick_s``: it reads the recent latencies (:class:`~service.serving.autopilot.LatencyWindow`, fed by the HTTP
middleware), the batcher's queue depth and throughput, steps the :class:`~service.serving.autopilot.Controller`
and, when the budget moved, publishes the matching hull point in memory (:meth:`StateWriter.move_operating`:
no ``active.json`` write, no version bump; every response names the point that served it).

**Axis.** When the serving bundle has a measured time axis (``timing.json``) and the mode is class means, the
budget is a fraction of the full network's measured time per sample at batch 1 and the points come from the
accuracy-time hull (:func:`~service.serving.time_profiles.time_candidates`); otherwise (an untimed bundle, an
IC mode) it is a FLOPs fraction on the mode's accuracy-FLOPs hull. ``info()["axis"]`` says which.

**Capacity and admission.** Each tick turns the batcher's measured busy time into seconds per sample of the
serving point (:class:`~service.serving.admission.CostEstimator`, scaled between points by their measured ms
at the batch size in use), so ``capacity = 1 / s`` samples per second in this process, and configures
:class:`~service.serving.admission.Admission` with the target: while engaged, a request that could not be
answered within the target is refused at once (503 ``shed`` with ``Retry-After``). A target below what the
cheapest allowed point needs at batch 1 (its measured ms plus
:data:`~service.serving.admission.HTTP_OVERHEAD_MS`) is refused when engaging (:class:`SloUnreachable`).
A request that would be refused first moves the point down at once (:meth:`AutopilotRuntime._relieve`,
:meth:`~service.serving.autopilot.Controller.relieve`: a quarter of the way to the floor, once per
:data:`RELIEF_GAP_S`; an arrival rate since the last tick :data:`STEP_RATIO` times the average is taken as a step
of load for the next tick's plan) and is judged again at the cheaper point's price.

**Load model** (planned moves, :class:`~service.serving.autopilot.Controller`). The process's CPU
(``time.process_time``: HTTP parsing, decoding, the network, encoding, refusals; less the background session
builds', :func:`serving_cpu_seconds`, which engaging starts and which would otherwise read as serving cost)
is modelled as
``cpu = fixed + rate * u(point)`` cores, with ``u(point) = s(point) + h``: ``s`` the point's network time per
sample (the measured time axis, or the FLOPs scale the estimator learnt) and ``h`` the marginal HTTP work per
sample (:data:`MARGINAL_OVERHEAD_MS`). Each tick measures the samples per second arriving (asked about by
admission, refused or not: an EWMA), the answered rate and the CPU rate, and updates ``fixed = cpu - answered
* u(point)`` (an EWMA, at least 0; not while more than :data:`SHED_SHARE_FROZEN` of the requests are refused,
whose handling it would count, lowering the admitted rate and refusing more). ``fixed`` is what a light load
pays per request and a heavy one shares
(per-batch work, wake-ups; measured on the default cascade pinned to one core: ``cpu = 0.17 + rate * (s +
0.8 ms)`` within 0.1 of a core from 100 to 650 requests/s, where a per-sample average measured at 100/s
priced 500/s at 1.5x its cost). The controller picks the costliest budget the arriving load affords on this
process's ``cores``. Admission's token bucket admits ``scale * (util * cores - fixed) / u(point)`` samples per
second, ``util = min(BUCKET_UTIL, util_cap + BUCKET_MARGIN)``: under overload the controller's p99 feedback on
the cap trims what is admitted, and a saturation guard (``scale``, :meth:`AutopilotRuntime._scale_bucket`)
trims it while the serving CPU is pegged and the answered p99 is not well inside the target
(:data:`ROOM`), which catches what neither sees: the model's error, the refusals'
own CPU and the backlog in the sockets (measured: a model-priced bucket admitted 1,000/s where the cheapest
point's real capacity is about 940/s, and the clients saw the sockets' backlog as a 250 ms p99 that the
server's own latencies never showed). Pricing the bucket by measured CPU per answered sample instead made a
spiral: refusals' CPU, counted against fewer answers, admitted fewer still (31 of 7,000 requests/s answered
under a closed-loop flood).

**Sessions.** Engaging asks the compiled engine to build, in the background, the sessions of every hull
vertex the autopilot may serve (a point first served under load would otherwise run on the reference engine
while its sessions build, slow, exactly when time is short).

**Trace.** Once a second the loop appends one record (target, p99, estimated accuracy, budget, shed rate,
rates) to a bounded ring buffer (:attr:`AutopilotRuntime.trace`, the last 10 minutes) that the operator's page
polls.

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
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.earlyexit import Operating, Profile, select_by_target
from service.earlyexit.hull import TargetUnreachable
from service.earlyexit.modes import BUNDLE_MODE
from service.earlyexit.time_axis import select_by_time
from service.errors import ServiceError
from service.serving.admission import HTTP_OVERHEAD_MS, Admission, CostEstimator, Shed
from service.serving.autopilot import (
    SATURATED,
    AutopilotConfig,
    Clock,
    Controller,
    LatencyWindow,
    Signal,
    Tuning,
)
from service.serving.compiled.sessions import build_cpu_seconds
from service.serving.ic_serving import mode_candidates
from service.serving.time_profiles import (
    LATENCY_BATCH,
    full_ms,
    nearest_batch,
    operating_ms,
    operating_time_fraction,
    time_candidates,
    time_fractions,
)
from service.store.bundles import BundleError

if TYPE_CHECKING:
    from service.serving.batcher import Batcher
    from service.serving.engine import Engine
    from service.serving.metrics import Metrics
    from service.serving.snapshot import Snapshot
    from service.store.bundle_model import Bundle

log = logging.getLogger("classmeans.autopilot")

TIME, FLOPS = "time", "flops"
SHED_SHARE_FROZEN = 0.05  # the fixed CPU is not re-measured while a larger share of requests is refused
MARGINAL_OVERHEAD_MS = 0.8  # CPU ms per sample beyond the network's, at the margin (module docstring)
BUCKET_UTIL = 0.95  # admission's token bucket: at most this share of what the serving point can answer
BUCKET_MARGIN = 0.1  # ... and at most the controller's utilisation cap plus this
DEMAND_ALPHA = 0.3  # EWMA weight of one tick's arrival rate (about a second at 0.25 s ticks)
FIXED_ALPHA = 0.2
UNSATURATED, MIN_BUCKET_SCALE = 0.9, 0.5  # the bucket's saturation guard (_scale_bucket), with SATURATED
ROOM = 0.7  # ... which does not trim while the answered p99 is under this share of the target
RELIEF_GAP_S = 0.05  # at most one relief move (a cheaper point between ticks) per this many seconds
RELIEF_MIN_SPAN_S = 0.05  # the arrival rate since the last tick is measured over at least this long
STEP_RATIO = 1.5  # a relief that finds arrivals this far over the average takes them as a step of load
TRACE_EVERY_S = 1.0
TRACE_LEN = 600  # ten minutes at one record a second


def serving_cpu_seconds() -> float:
    """This process's CPU seconds less what background session builds spent: the serving work's CPU."""
    return time.process_time() - build_cpu_seconds()


class SloUnreachable(ServiceError):
    """A latency target below what the cheapest allowed point achieves at batch 1 (422)."""

    code, status = "slo_unreachable", 422


def bounds(candidates: list[Profile], min_accuracy: float | None) -> tuple[float, float]:
    """``(floor, ceiling)`` on the candidates' cost axis (``flops_fraction``, or the time fraction of
    :func:`time_candidates`): the cheapest point with accuracy ``>= min_accuracy`` (the cheapest point when
    None), and the costliest vertex that still meets it (the full network, unless it falls below the floor's
    accuracy). Every budget in between gives a point at least ``min_accuracy`` accurate (estimated). Raises
    :class:`TargetUnreachable` when no point meets ``min_accuracy``."""
    if min_accuracy is None:
        return min(p.flops_fraction for p in candidates), max(p.flops_fraction for p in candidates)
    floor = select_by_target(candidates, min_accuracy=min_accuracy).flops_fraction
    ceiling = max(p.flops_fraction for p in candidates if p.accuracy >= min_accuracy - 1e-12)
    return floor, max(floor, ceiling)


def axis_for(bundle: Bundle, mode: str) -> str:
    """``"time"`` when the bundle's class-means profiles are timed on this machine, else ``"flops"``."""
    return TIME if mode == BUNDLE_MODE and time_candidates(bundle) else FLOPS


@dataclass(frozen=True)
class Plan:
    """What engaging a configuration on a bundle means: its axis, its bounds on that axis, the floor point
    and what it needs at batch 1 (time axis only)."""

    axis: str
    floor: float
    ceiling: float
    floor_point: Operating
    reachable_ms: float | None
    candidates: tuple[Profile, ...] = ()  # the hull vertices on ``axis`` (``flops_fraction``: the axis value)


@dataclass
class _Engaged:
    config: AutopilotConfig
    controller: Controller
    version: int
    bundle: str
    plan: Plan

    @property
    def axis(self) -> str:
        return self.plan.axis


class AutopilotRuntime:
    """One per serving process: follows the persisted configuration, runs the controller and admission."""

    def __init__(self, engine: Engine, batcher: Batcher, window: LatencyWindow, metrics: Metrics | None = None,
                 tuning: Tuning | None = None, tick_s: float = 0.25, window_s: float = 3.0, min_samples: int = 50,
                 clock: Clock = time.monotonic, admission: Admission | None = None,
                 wall_clock: Clock = time.time, cores: float = 1.0,
                 cpu_clock: Clock | None = None) -> None:
        self.engine, self.batcher, self.window, self.metrics = engine, batcher, window, metrics
        self.cores = max(1e-3, float(cores))  # the CPU this process has (its share of the usable cores)
        self.cpu_clock = cpu_clock or serving_cpu_seconds
        self._cpu = self.cpu_clock()
        self._answered = batcher.stats.samples
        self._checked = (0, 0)  # admission's (checked_samples, shed_samples) at the last tick
        self._last_tick_t: float | None = None
        self.demand_sps: float | None = None  # samples per second arriving (EWMA)
        self.overhead_s = MARGINAL_OVERHEAD_MS / 1000.0  # marginal CPU seconds per sample beyond the network's
        self.fixed_cores: float | None = None  # CPU (cores) beyond rate x unit cost (EWMA)
        self.cpu_util: float | None = None  # the serving work's CPU over the last tick, in cores (EWMA)
        self.bucket_scale = 1.0  # the admitted rate's share of the model's: cut while the CPU is saturated
        self.tuning = tuning or Tuning()
        self.tick_s, self.window_s, self.clock, self.wall_clock = tick_s, window_s, clock, wall_clock
        self.min_samples = min_samples  # fewer answers since the last move: no p99 (the max of a few is noise)
        self.state: _Engaged | None = None
        self.last_signal = Signal(None)
        self.admission = admission or Admission()
        self.trace: deque[dict[str, Any]] = deque(maxlen=TRACE_LEN)
        self._seen_version: int | None = None
        self._rate = 0.0  # samples per second answered (EWMA over ticks)
        self._busy = (batcher.stats.busy_s, batcher.stats.busy_samples, batcher.stats.batches)
        self._batch_mean = 1.0
        self._estimator: CostEstimator | None = None
        self._estimator_key: tuple[str, bool] | None = None
        self._counts: deque[tuple[float, int, int]] = deque()  # (t, checked, shed) per tick, window_s long
        self._last_trace_t = -float("inf")
        self._offered_rps = 0.0  # requests per second asked about over window_s, beside shed_rate (the trace)
        self.shed_rate = 0.0
        self.loop_lag_s = 0.0
        self._relieved_t = -float("inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def engaged(self) -> bool:
        return self.state is not None

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
        """Turn the autopilot on with ``config``, in one call: its plan on the serving bundle (raises what
        :meth:`check` raises, changing nothing), the configuration persisted (in a worker thread: the store's
        lock and an fsync), then engaged with that plan. Returns the snapshot serving afterwards."""
        plan = self.check(config)
        new = await asyncio.to_thread(self.engine.writer.persist_autopilot, config)
        self.follow(planned=(config, new.bundle_id, plan))
        return self.engine.snapshot

    def follow(self, planned: tuple[AutopilotConfig, str, Plan] | None = None) -> None:
        """When the served version changed, engage or disengage as the configuration it carries says.
        ``planned``: (configuration, bundle, plan) already computed by :meth:`engage`."""
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
        known = planned[2] if planned is not None and planned[:2] == (config, snap.bundle_id) else None
        try:
            self._engage(config, snap.version, known)
        except (ValueError, TargetUnreachable, BundleError, SloUnreachable) as exc:
            log.error("autopilot configuration in active.json (version %d) is unusable: %s", snap.version, exc)
            self._disengage(f"unusable configuration: {exc}")

    def check(self, config: AutopilotConfig) -> Plan:
        """The :class:`Plan` of ``config`` on the serving bundle; raises what :func:`bounds` and
        :func:`mode_candidates` raise (floor no point meets, mode not available now) and
        :class:`SloUnreachable` for a target below what the floor point needs at batch 1 (time axis)."""
        snap = self.engine.snapshot
        b = snap.bundle
        axis = axis_for(b, config.mode)
        if axis == TIME:
            cands = time_candidates(b)
            floor, ceiling = bounds(cands, config.min_accuracy)
            point = select_by_time(b.profiles, time_fractions(b), floor)
            full = full_ms(b)
            floor_ms = operating_ms(b, point)
            reachable = None if floor_ms is None or full is None else floor_ms + HTTP_OVERHEAD_MS
            if reachable is not None and config.target_ms < reachable:
                floor_txt = ("the cheapest point" if config.min_accuracy is None
                             else f"the cheapest point with estimated accuracy >= {config.min_accuracy:g}")
                raise SloUnreachable(
                    f"latency_slo_ms {config.target_ms:g} is below what {floor_txt} ({point.name}) achieves at "
                    f"batch 1 on this machine: {floor_ms:.3g} ms per sample + {HTTP_OVERHEAD_MS:g} ms HTTP "
                    f"overhead = {reachable:.3g} ms; reachable: latency_slo_ms >= {reachable:.3g} (the full "
                    f"network needs {full + HTTP_OVERHEAD_MS:.3g} ms)")
            return Plan(TIME, floor, ceiling, point, reachable, tuple(cands))
        cands = mode_candidates(b, snap.ic, config.mode)
        floor, ceiling = bounds(cands, config.min_accuracy)
        return Plan(FLOPS, floor, ceiling, select_by_target(cands, max_flops_fraction=floor), None, tuple(cands))

    def _position(self, snap: Snapshot, axis: str) -> float:
        """Where the serving point sits on ``axis`` (its time fraction at batch 1, or FLOPs fraction)."""
        if axis == TIME:
            f = operating_time_fraction(snap.bundle, snap.operating)
            if f is not None:
                return f
        return snap.operating.flops_fraction

    def _engage(self, config: AutopilotConfig, version: int, known: Plan | None = None) -> None:
        snap = self.engine.snapshot
        old = self.state
        if old is not None and old.config == config and old.bundle == snap.bundle_id:
            old.version = version  # same configuration re-persisted or adopted from the store: keep the
            self._publish(old.controller.f, 0)  # controller's state, and its point (not the persisted one)
            return
        plan = known if known is not None else self.check(config)
        bottom = min([plan.floor, *(c.flops_fraction for c in plan.candidates)])  # the curve's cheapest point
        ctl = Controller(config.target_s, plan.floor, plan.ceiling, self._position(snap, plan.axis), self.clock,
                         self.tuning, f_bottom=bottom)
        self.state = _Engaged(config, ctl, version, snap.bundle_id, plan)
        self._prebuild(plan)
        log.warning("autopilot on: p99 target %.1f ms, %s axis, floor %.3f, ceiling %.3f, mode %s",
                    config.target_ms, plan.axis, plan.floor, plan.ceiling, config.mode)
        if self.metrics is not None:
            self.metrics.autopilot_target.labels(self.metrics.model).set(config.target_s)
        self._publish(ctl.f, 0)

    def _prebuild(self, plan: Plan) -> None:
        """Ask the engine for the sessions of every vertex in ``[floor, ceiling]`` (and the two around it),
        built in the background (module docstring)."""
        names = [p.name for p in plan.candidates]
        fs = [p.flops_fraction for p in plan.candidates]
        lo = max([i for i, f in enumerate(fs) if f <= plan.floor + 1e-12], default=0)
        hi = min([i for i, f in enumerate(fs) if f >= plan.ceiling - 1e-12], default=len(fs) - 1)
        wanted = names[lo: hi + 1]
        try:
            self.engine.prebuild(wanted)
        except Exception:  # building is an optimisation; serving goes on without it
            log.exception("autopilot: asking for the sessions of %d points failed", len(wanted))

    def _disengage(self, why: str) -> None:
        if self.state is not None:
            log.warning("autopilot off: %s", why)
        self.state = None
        self.admission.configure(None, None)
        if self.metrics is not None:
            self.metrics.autopilot_enabled.labels(self.metrics.model).set(0)
            self.metrics.autopilot_target.labels(self.metrics.model).set(0)

    # -- cost, capacity, admission --------------------------------------------------------------------

    def _cost(self, bundle: Bundle, op: Operating) -> float | None:
        """Cost units per sample of ``op`` at the batch size in use: measured ms (time axis), else its FLOPs
        fraction."""
        batch = nearest_batch(bundle, self._batch_mean)
        if batch is not None and (self.state is None or self.state.axis == TIME):
            ms = operating_ms(bundle, op, batch)
            if ms is not None:
                return ms
        return op.flops_fraction

    def _estimator_for(self, bundle: Bundle) -> CostEstimator:
        """One estimate per (bundle, unit): costs in measured ms start from timing.json's word (``k`` =
        1e-3 s/ms); costs in FLOPs fractions (untimed bundle, IC mode) from nothing."""
        timed = bool(time_fractions(bundle, LATENCY_BATCH)) and (self.state is None or self.state.axis == TIME)
        key = (bundle.bundle_id, timed)
        if self._estimator is None or self._estimator_key != key:
            self._estimator, self._estimator_key = CostEstimator(prior_k=1e-3 if timed else None, additive=timed), key
        return self._estimator

    def per_sample_s(self, op: Operating | None = None) -> float | None:
        """Measured seconds per sample of ``op`` (default: the serving point) at the batch size in use."""
        snap = self.engine.snapshot
        op = op or snap.operating
        return self._estimator_for(snap.bundle).per_sample_s(self._cost(snap.bundle, op))

    def _measure(self, before: Operating) -> None:
        """The batcher's busy time since the last tick, at the point that served it, into the estimate."""
        st = self.batcher.stats
        busy, n, batches = st.busy_s - self._busy[0], st.busy_samples - self._busy[1], st.batches - self._busy[2]
        self._busy = (st.busy_s, st.busy_samples, st.batches)
        if batches > 0 and n > 0:
            self._batch_mean = 0.7 * self._batch_mean + 0.3 * (n / batches)
        bundle = self.engine.snapshot.bundle
        self._estimator_for(bundle).observe(busy, n, self._cost(bundle, before))

    def _configure_admission(self) -> None:
        st = self.state
        if st is None:
            self.admission.configure(None, None)
            return
        self.admission.configure(st.config.target_s, self.per_sample_s(), self.batcher.max_delay_s,
                                 self.batcher.max_batch_size, arrival_rate=self.demand_sps or None)
        self.admission.set_rate(self._admit_rate(st), self.clock())

    def _admit_rate(self, st: _Engaged) -> float | None:
        """Samples per second the token bucket admits: the model's ``(util * cores - fixed) / u(point)``,
        ``util = min(BUCKET_UTIL, util_cap + BUCKET_MARGIN)``, times :attr:`bucket_scale` (module docstring)."""
        util = min(BUCKET_UTIL, st.controller.util_cap + BUCKET_MARGIN)
        u = self.unit_cost_s()
        if not u:
            return None
        return self.bucket_scale * max(util * self.cores - (self.fixed_cores or 0.0), 0.05 * self.cores) / u

    def _scale_bucket(self, p99_s: float | None = None, backlog_s: float = 0.0) -> None:
        """Saturation guard: the model's error, refusals' own CPU and the sockets' backlog are invisible to
        the admitted rate; a saturated CPU is not. Over :data:`SATURATED` of the cores while refusing at the
        floor, with the answered p99 (``p99_s``, the controller's window) not under :data:`ROOM` of the target
        or a backlog (``backlog_s``: the queue's expected wait or the event loop's lag, the larger) over the
        rest of it (the sockets' backlog shows there, never in the answered p99), admit 10 % less a tick (down
        to :data:`MIN_BUCKET_SCALE`); under :data:`UNSATURATED`, or with that room, 5 % more (up to 1). Above
        the floor a saturated CPU asks for a cheaper point instead (the controller's pressure, relief):
        trimming admission there refuses what a cheaper point would answer. (On the CPU alone, the guard was a
        ratchet under overload: the refusals keep the core busy whatever is admitted, so it only ever cut, to
        half the model's rate, while the answered p99 was a third to two thirds of the target: measured at 3x
        with the floor, 345 req/s answered of the floor point's 632. With the p99's word, two 30 s probes each
        at 3x: 447 and 493 req/s answered, p99 37 and 31 ms, against 369 and 353 req/s, p99 54 and 41 ms,
        alternating on one machine; at 2x, 30,725 against 30,915 answers in two probes each, p99 52/37
        against 39/43 ms.)"""
        c, st = self.cpu_util, self.state
        if c is None:
            return
        at_floor = st is not None and st.controller.f <= st.controller.floor + 1e-12
        target = st.controller.target_s if st is not None else None
        room = (p99_s is not None and target is not None and p99_s < ROOM * target
                and backlog_s < (1.0 - ROOM) * target)
        if c >= SATURATED * self.cores and self.shed_rate > 0 and at_floor and not room:
            self.bucket_scale = max(MIN_BUCKET_SCALE, 0.9 * self.bucket_scale)
        elif c < UNSATURATED * self.cores or room:
            self.bucket_scale = min(1.0, 1.05 * self.bucket_scale)

    def unit_cost_s(self, op: Operating | None = None) -> float | None:
        """Marginal CPU seconds per sample at ``op`` (default: the serving point): the point's network time
        plus the marginal HTTP work (module docstring); None before any estimate of the network time."""
        snap = self.engine.snapshot
        return self._unit_cost(snap.bundle, self._estimator_for(snap.bundle), op or snap.operating)

    def _unit_cost(self, bundle: Bundle, est: CostEstimator, op: Operating) -> float | None:
        s = est.network_s(self._cost(bundle, op))
        return None if s is None else s + self.overhead_s

    def _measure_load(self, before: Operating, now: float) -> None:
        """Arrival rate, answered rate and the fixed CPU, from the counters since the last tick."""
        cpu, answered, checked = self.cpu_clock(), self.batcher.stats.samples, self.admission.checked_samples
        shed = self.admission.shed_samples
        d_cpu, d_ans, d_checked = cpu - self._cpu, answered - self._answered, checked - self._checked[0]
        d_shed = shed - self._checked[1]
        self._cpu, self._answered, self._checked = cpu, answered, (checked, shed)
        last, self._last_tick_t = self._last_tick_t, now
        if last is None or now <= last:
            return
        dt = now - last
        inst = d_ans / dt
        self._rate = inst if self._rate == 0.0 else 0.5 * self._rate + 0.5 * inst
        prev_c = self.cpu_util
        self.cpu_util = d_cpu / dt if prev_c is None else 0.5 * prev_c + 0.5 * d_cpu / dt
        old = self.demand_sps
        self.demand_sps = d_checked / dt if old is None else (1 - DEMAND_ALPHA) * old + DEMAND_ALPHA * d_checked / dt
        u = self.unit_cost_s(before)
        if u is None or d_shed > SHED_SHARE_FROZEN * max(d_checked, 1):
            return  # refusals cost CPU too: counted as fixed, they would lower the admitted rate, refusing more
        fixed = min(self.cores, max(0.0, d_cpu / dt - d_ans / dt * u))
        prev = self.fixed_cores
        self.fixed_cores = fixed if prev is None else (1 - FIXED_ALPHA) * prev + FIXED_ALPHA * fixed

    def _costs(self, st: _Engaged) -> tuple[tuple[float, float], ...] | None:
        """``((f, u), ...)``: the CPU seconds per sample of each hull vertex, by its axis value (the bundle
        and its estimator looked up once: this runs every tick, on the event loop)."""
        bundle = self.engine.snapshot.bundle
        est = self._estimator_for(bundle)
        out = []
        for p in st.plan.candidates:
            u = self._unit_cost(bundle, est, Operating(p.name, flops_fraction=p.flops_fraction, accuracy=p.accuracy))
            if u is None:
                return None
            out.append((p.flops_fraction, u))
        return tuple(sorted(out)) or None

    def admit(self, n: int) -> None:
        """Admission control for a request of ``n`` samples (raises :class:`~service.serving.admission.Shed`,
        counted in the metrics) while engaged; a no-op otherwise. A request that would be refused first
        offers the controller a cheaper point (:meth:`_relieve`)."""
        adm = self.admission
        try:
            per = adm.per_sample_s or 0.0
            adm.check(self.batcher.queued_samples, self.batcher.running_left_s(per), n, self.clock(),
                      relieve=self._relieve)
        except Shed:
            if self.metrics is not None:
                self.metrics.reject("shed")
                self.metrics.shed.labels(self.metrics.model).inc()
            raise

    def _recent_demand_sps(self, now: float) -> float | None:
        """Samples per second asked about since the last tick (None: too soon after it to say)."""
        last = self._last_tick_t
        if last is None or now - last < RELIEF_MIN_SPAN_S:
            return None
        return (self.admission.checked_samples - self._checked[0]) / (now - last)

    def _relieve(self) -> bool:
        """Admission's ``relieve``: move to a cheaper point now (:meth:`Controller.relieve`) and reprice
        admission for it; True when it moved. At most once per :data:`RELIEF_GAP_S`; planned mode only (the
        next tick's plan, from the load model, says where to go from there)."""
        st = self.state
        now = self.clock()
        if st is None or now - self._relieved_t < RELIEF_GAP_S:
            return False
        if not st.controller.planned:
            return False
        self._relieved_t = now
        recent = self._recent_demand_sps(now)
        if recent is not None and self.demand_sps is not None and recent > STEP_RATIO * self.demand_sps:
            self.demand_sps = recent  # a step of load: the next tick plans from it, not from the old average
        d = st.controller.relieve(recent)
        if not d.direction:
            return False
        self._publish(d.f, d.direction)
        return True

    # -- the loop's work ------------------------------------------------------------------------------

    def signal(self) -> Signal:
        """Recent p99 (answers started after the last move), expected queue wait (the queue over the answered
        rate :meth:`_measure_load` measured), refusals."""
        st = self.state
        since = st.controller.feedback_since if st is not None else -float("inf")
        w = self.window.stats(self.window_s, since=since, min_samples=self.min_samples)
        queued = self.batcher.queued_samples
        delay = queued / self._rate if self._rate > 0 else (self.window_s if queued else 0.0)
        costs = self._costs(st) if st is not None else None
        demand = self.demand_sps if costs is not None and self.demand_sps is not None else None
        return Signal(w.p99_s, max(delay, self.loop_lag_s), w.rejected, w.count, demand, costs, self.cores,
                      self.fixed_cores or 0.0, self.cpu_util)

    def _count_sheds(self, now: float) -> None:
        """The shed rate over the last ``window_s``: requests refused / requests asked about."""
        self._counts.append((now, self.admission.checked, self.admission.shed))
        while len(self._counts) > 2 and self._counts[0][0] < now - self.window_s:
            self._counts.popleft()
        t0, c0, s0 = self._counts[0]
        checked, shed = self.admission.checked - c0, self.admission.shed - s0
        self.shed_rate = shed / checked if checked > 0 else 0.0
        self._offered_rps = checked / (now - t0) if now > t0 else 0.0

    def tick(self) -> None:
        serving = self.engine.snapshot.operating
        self.follow()
        self._measure(serving)
        now = self.clock()
        self._measure_load(serving, now)
        self._count_sheds(now)
        self.last_signal = s = self.signal()
        if self.state is not None:
            self._scale_bucket(s.p99_s, s.queue_delay_s)
            d = self.state.controller.step(s)
            if d.direction:
                self._publish(d.f, d.direction)
        self._configure_admission()
        if now - self._last_trace_t >= TRACE_EVERY_S - 1e-9:
            self._last_trace_t = now
            self.trace.append(self._trace_record())

    def _publish(self, f: float, direction: int) -> None:
        st = self.state
        assert st is not None
        new = self.engine.writer.move_operating(f, st.config.mode, st.version, axis=st.axis)
        if new is None:  # a persisted switch won the race; follow it on the next tick
            return
        self._configure_admission()
        m = self.metrics
        if m is not None:
            m.autopilot_enabled.labels(m.model).set(1)
            m.autopilot_flops_fraction.labels(m.model).set(new.operating.flops_fraction)
            m.autopilot_budget.labels(m.model).set(f)
            if direction:
                m.autopilot_moves.labels(m.model, "down" if direction < 0 else "up").inc()

    # -- reporting ------------------------------------------------------------------------------------

    def _trace_record(self) -> dict[str, Any]:
        st, s = self.state, self.last_signal
        op = self.engine.snapshot.operating
        return {"t": round(self.wall_clock(), 3), "enabled": st is not None,
                "target_ms": None if st is None else st.config.target_ms,
                "p99_ms": None if s.p99_s is None else round(1000 * s.p99_s, 3),
                "accuracy": op.accuracy, "operating": op.name, "flops_fraction": op.flops_fraction,
                "axis": None if st is None else st.axis, "budget": None if st is None else st.controller.f,
                "shed_rate": self.shed_rate, "offered_rps": self._offered_rps, "answered_sps": self._rate,
                "queue_delay_ms": round(1000 * s.queue_delay_s, 3), "demand_sps": self.demand_sps,
                "util_cap": None if st is None or not st.controller.planned else st.controller.util_cap,
                "predicted_util": None if st is None else st.controller.predicted_util}

    def trace_info(self, since: float | None = None) -> dict[str, Any]:
        """For the operator's page: the ring buffer (records with ``t > since`` when given)."""
        ticks = [r for r in self.trace if since is None or r["t"] > since]
        return {"enabled": self.state is not None, "every_s": TRACE_EVERY_S, "max_len": TRACE_LEN,
                "ticks": ticks}

    def info(self) -> dict[str, Any]:
        """For ``GET /profiles``: on or off, the target, the axis and bounds, the point held now, why,
        recent p99, shed rate, measured capacity."""
        st, s = self.state, self.last_signal
        out: dict[str, Any] = {"enabled": st is not None,
                               "p99_ms": None if s.p99_s is None else 1000 * s.p99_s,
                               "queue_delay_ms": 1000 * s.queue_delay_s, "window_samples": s.samples,
                               "shed_rate": self.shed_rate, "shed_total": self.admission.shed,
                               "shed_by_queue": self.admission.shed_by_queue,
                               "shed_by_rate": self.admission.shed_by_rate,
                               "relief_moves": self.admission.relieved,
                               "relieved_admitted": self.admission.relieved_admitted,
                               "tail_admitted": self.admission.tail_admitted}
        if st is None:
            return out
        c = st.controller
        snap = self.engine.snapshot
        op = snap.operating
        per = self.per_sample_s()
        floor_per = self.per_sample_s(st.plan.floor_point)
        ceiling_point = self._ceiling_point(snap, st)
        unit = self.unit_cost_s()
        out.update({"target_ms": st.config.target_ms, "latency_slo_ms": st.config.target_ms,
                    "min_accuracy": st.config.min_accuracy, "mode": st.config.mode, "axis": st.axis,
                    "floor": c.floor, "ceiling": c.ceiling, "budget": c.f,
                    "floor_flops_fraction": st.plan.floor_point.flops_fraction,
                    "ceiling_flops_fraction": ceiling_point.flops_fraction,
                    "budget_flops_fraction": op.flops_fraction,
                    "budget_ms": c.f * full_ms(snap.bundle) if st.axis == TIME and full_ms(snap.bundle) else None,
                    "reachable_ms": st.plan.reachable_ms, "pressure": c.pressure, "moves": c.moves,
                    "why": c.reason, "reason": c.reason, "operating": op.name,
                    "operating_point": {"name": op.name, "a": op.a, "b": op.b, "lam": op.lam,
                                        "flops_fraction": op.flops_fraction, "accuracy": op.accuracy,
                                        "ms": operating_ms(snap.bundle, op)},
                    "accuracy": op.accuracy, "floor_point": st.plan.floor_point.name,
                    "per_sample_ms": None if per is None else 1000 * per,
                    "capacity_rps": None if not per else 1.0 / per,
                    "floor_capacity_rps": None if not floor_per else 1.0 / floor_per,
                    "queue_bound": self.admission.max_queued(), "batch_in_use": self._batch_mean,
                    "planned": c.planned, "util_cap": c.util_cap, "predicted_util": c.predicted_util,
                    "demand_sps": self.demand_sps, "cores": self.cores,
                    "overhead_ms": 1000 * self.overhead_s, "fixed_cores": self.fixed_cores,
                    "cpu_util": self.cpu_util, "bucket_scale": self.bucket_scale,
                    "loop_lag_ms": 1000 * self.loop_lag_s,
                    "unit_cost_ms": None if unit is None else 1000 * unit,
                    "admit_rate_sps": self.admission.rate_sps})
        return out

    def _ceiling_point(self, snap: Snapshot, st: _Engaged) -> Operating:
        b = snap.bundle
        if st.axis == TIME:
            return select_by_time(b.profiles, time_fractions(b), st.plan.ceiling)
        return select_by_target(mode_candidates(b, snap.ic, st.config.mode), max_flops_fraction=st.plan.ceiling)
