"""The latency autopilot's controller: hold a p99 target by moving along the accuracy-cost curve.

Pure logic, no HTTP, no disk; the clock is injected (tests drive it by hand). The runtime loop
(:mod:`service.serving.autopilot_runtime`) feeds it a :class:`Signal` a few times a second and publishes the
hull point for the FLOPs budget it returns.

**Output.** A continuous cost budget ``f`` in ``[f_floor, f_ceiling]``, on whichever axis the runtime steers:
a fraction of the full network's measured time per sample at batch 1 (a timed bundle: the accuracy-time hull)
or its FLOPs fraction (untimed); the controller does not care which. The engine turns ``f`` into the most
accurate hull point costing at most ``f`` (a time-shared mix of two vertices between vertices), so the
operating point moves continuously. ``f_floor`` is the cheapest point meeting the operator's
``min_accuracy`` (or the cheapest point of the mode), ``f_ceiling`` the full network (or, when the full network
is estimated below ``min_accuracy``, the costliest vertex that meets it).

**Pressure.** One number per tick, the worst of three ratios to the target ``T`` (``> 1``: over target)::

    x = max( p99 / T,                       # recent p99 of answered requests (after the last move)
             queue_delay / (q * T),         # expected wait of a request arriving now; q = queue_share
             reject_pressure if rejected )  # 503/504s since the last move (>= 1 % of requests): an emergency

The queue term is the leading indicator (latency percentiles lag); it may use a share ``q`` of the budget.
The runtime takes the larger of the batcher's backlog over its recent throughput and the event loop's lag
(how late its own timer fires: requests waiting to be parsed are invisible to the batcher).

**Planned moves** (when the runtime knows the load: ``Signal.demand_sps`` and ``Signal.costs``). The
budget follows the offered load at once: ``f`` is the costliest budget whose predicted utilisation fits a cap,
``f = max{ f in [f_floor, f_ceiling] : (fixed + demand * u(f)) / cores <= util_cap }`` (:func:`affordable`),
where ``u(f)`` is the marginal CPU seconds per sample of the point at budget ``f`` (piecewise linear between
hull vertices, as time sharing mixes them) and ``fixed`` the CPU the process spends beyond that (per-batch
work that a light load pays per request and a heavy one shares: measured, so a model fitted at a light load
does not overprice a heavy one). A rising load moves ``f`` down in the tick it is measured, a falling
one moves it back up as fast (no probing, no hold: the model says what fits). Feedback corrects the model:
pressure over ``plan_high`` multiplies ``util_cap`` by ``clip(plan_high / x, cap_cut, 0.95)`` (at most every
``down_dwell_s``), pressure under ``plan_low`` adds ``cap_up`` (at most every ``cap_up_dwell_s``), within
``[util_min, util_max]``. When even the floor's predicted utilisation is over the cap the server is overloaded
and admission control sheds the excess (:mod:`service.serving.admission`); the runtime admits at most what the
cap (plus a margin) allows, so there the cap's feedback trims the admitted rate until the answered p99 fits.
Once the cap is at ``util_min`` and the p99 is still over ``plan_high``, the latency is not the load's (a
target near what one request takes): the budget itself is bounded, ``f_latency <- f * clip(plan_high / x,
max_cut, min_cut)``, and the bound is lifted by a quarter of ``[floor, ceiling]`` a second under ``plan_low``.
In this mode the p99 and a saturated CPU (:data:`SATURATED`) are pressure (refusals are admission's, at the
cap); the queue delay
counts only past the whole target (a backlog that cannot meet it), so that one burst seen in a 0.25 s sample
does not cut the cap.

**Relief** (:meth:`Controller.relieve`, planned mode): between ticks, when admission is about to refuse a
request, the runtime asks for a cheaper budget at once: ``max(floor, bottom + relief_cut * (f - bottom))``,
``bottom`` the curve's cheapest point whether or not an accuracy floor is set. A step of load
is met within the request that finds it, not a tick later, and a Poisson burst at a load the current point
carries costs a moment of accuracy instead of refusals.

**Moves without a load model** (an untimed bundle before its first measurement; AIMD with a dead band):

* ``x > high``: multiplicative decrease, ``f <- max(f_floor, f * clip((high / x) ** gain, max_cut, min_cut))``
  at most every ``down_dwell_s``: the further over, the bigger the cut (at most ``max_cut``: a quarter).
* ``x < low``: additive increase, ``f <- min(f_ceiling, f + up_step * (f_ceiling - f_floor))`` at most every
  ``up_dwell_s`` (slow up, fast down).
* ``low <= x <= high``: the dead band; hold.

**Hysteresis.** A constant signal never reverses the direction: inside the band nothing moves, above it
``f`` only falls (to the floor at worst), below it ``f`` only rises. Under a load that depends on ``f``,
a cut at ``f_bad`` remembers ``f_bad``: for ``hold_s`` seconds an up-move stops half a step below it. A cut
right after an up-move (a failed probe) doubles ``hold_s`` (up to ``max_hold_s``), so probes into a
region known to be too expensive become rare (exponential back-off) and start from the lowest point known too
expensive; ``hold_s`` resets after ``2 * max_hold_s`` without cuts.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.earlyexit.modes import BUNDLE_MODE, is_mode

Clock = Callable[[], float]

SATURATED = 0.97  # of the cores: a CPU this busy is saturated
MIN_TARGET_MS = 1.0  # below: not a latency a network can be served in over HTTP
MAX_TARGET_MS = 60_000.0  # above: not a latency target but a timeout


@dataclass(frozen=True)
class AutopilotConfig:
    """What the operator asked for: a p99 target, an optional accuracy floor, the decision mode.

    This (not the moving operating point) is what ``active.json`` persists under ``"autopilot"``.
    """

    target_ms: float
    min_accuracy: float | None = None
    mode: str = BUNDLE_MODE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_ms) and MIN_TARGET_MS <= self.target_ms <= MAX_TARGET_MS):
            raise ValueError(f"latency_slo_ms must be between {MIN_TARGET_MS:g} and {MAX_TARGET_MS:g}")
        if self.min_accuracy is not None and not (math.isfinite(self.min_accuracy) and 0 <= self.min_accuracy <= 1):
            raise ValueError("min_accuracy must be between 0 and 1")
        if not is_mode(self.mode):
            raise ValueError(f"unknown mode {self.mode!r}")

    @property
    def target_s(self) -> float:
        return self.target_ms / 1000.0

    def to_json(self) -> dict[str, Any]:
        return {"latency_slo_ms": self.target_ms, "min_accuracy": self.min_accuracy, "mode": self.mode}

    @classmethod
    def from_json(cls, obj: Any) -> AutopilotConfig:
        """From ``active.json``'s ``"autopilot"`` object; raises ``ValueError`` when malformed."""
        if not isinstance(obj, dict) or "latency_slo_ms" not in obj:
            raise ValueError("autopilot must be an object with latency_slo_ms")
        try:
            floor = obj.get("min_accuracy")
            return cls(float(obj["latency_slo_ms"]), None if floor is None else float(floor),
                       str(obj.get("mode") or BUNDLE_MODE))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"autopilot: {exc}") from None


def parse_persisted(active: dict[str, Any]) -> tuple[AutopilotConfig | None, str | None]:
    """``active.json``'s ``"autopilot"`` key, parsed once where the state is adopted: (the configuration, or
    None when the key is absent or unusable; why it is unusable, or None)."""
    raw = active.get("autopilot")
    if raw is None:
        return None, None
    try:
        return AutopilotConfig.from_json(raw), None
    except ValueError as exc:
        return None, str(exc)


@dataclass(frozen=True)
class Tuning:
    """The controller's constants (see the module docstring for what each does)."""

    high: float = 0.8
    low: float = 0.6
    queue_share: float = 0.5
    reject_pressure: float = 2.0
    reject_share: float = 0.01  # refusals count as an emergency from this share of the window's requests on
    gain: float = 1.0
    max_cut: float = 0.25
    min_cut: float = 0.9
    up_step: float = 0.1
    down_dwell_s: float = 0.5
    up_dwell_s: float = 1.5
    hold_s: float = 10.0
    max_hold_s: float = 120.0
    probe_window_s: float = 5.0  # a cut this soon after an up-move counts as a failed probe
    util_start: float = 0.85  # planned moves: the utilisation cap to start from
    util_min: float = 0.4
    util_max: float = 0.95
    cap_cut: float = 0.7  # the largest cut of the cap in one move
    cap_up: float = 0.1
    cap_up_dwell_s: float = 1.0
    plan_high: float = 0.9  # planned moves: the band of p99 / target in which the cap holds
    plan_low: float = 0.7
    min_move: float = 0.005  # planned moves smaller than this share of [floor, ceiling] are not made
    relief_cut: float = 0.75  # a relief move keeps this share of the way from the curve's cheapest point to f

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError("need 0 < low < high")
        if not 0 < self.max_cut <= self.min_cut < 1:
            raise ValueError("need 0 < max_cut <= min_cut < 1")
        if not 0 < self.up_step <= 1 or self.queue_share <= 0:
            raise ValueError("up_step must be in (0, 1], queue_share positive")
        if not 0 < self.relief_cut < 1:
            raise ValueError("need 0 < relief_cut < 1")
        if not 0 < self.util_min <= self.util_start <= self.util_max or not 0 < self.cap_cut < 1:
            raise ValueError("need 0 < util_min <= util_start <= util_max and 0 < cap_cut < 1")


@dataclass(frozen=True)
class Signal:
    """What the server knows now. ``p99_s``: None when too few answers since the last move."""

    p99_s: float | None
    queue_delay_s: float = 0.0
    rejected: int = 0
    samples: int = 0
    # The load model (planned moves; None: AIMD): samples per second arriving (admitted or not), and the CPU
    # seconds per sample at each hull vertex, ``((f, u), ...)`` by increasing ``f``; ``cores`` this process has.
    demand_sps: float | None = None
    costs: tuple[tuple[float, float], ...] | None = None
    cores: float = 1.0
    fixed_cores: float = 0.0  # CPU busy whatever the load's size (cores): the model is fixed + demand * u(f)
    cpu_util: float | None = None  # the serving work's measured CPU (cores): saturated is pressure when planned

    @property
    def planned(self) -> bool:
        return self.demand_sps is not None and bool(self.costs)


def unit_cost(costs: tuple[tuple[float, float], ...], f: float) -> float:
    """``u(f)``: CPU seconds per sample at budget ``f``, linear between the vertices ``costs`` (a time-shared
    mix of two vertices costs the mix of their costs), flat outside them."""
    if f <= costs[0][0]:
        return costs[0][1]
    for (f0, u0), (f1, u1) in itertools.pairwise(costs):
        if f <= f1:
            return u0 + (u1 - u0) * ((f - f0) / (f1 - f0) if f1 > f0 else 1.0)
    return costs[-1][1]


def affordable(costs: tuple[tuple[float, float], ...], demand_sps: float, cores: float, util_cap: float,
               f_floor: float, f_ceiling: float, fixed_cores: float = 0.0) -> float:
    """The costliest budget in ``[f_floor, f_ceiling]`` whose predicted utilisation
    ``(fixed_cores + demand_sps * u(f)) / cores`` is at most ``util_cap`` (``f_floor`` when none is: overload).

    ``u`` is made non-decreasing first (a vertex measured cheaper than a cheaper vertex costs as much as the
    dearest one before it), so the answer is a single crossing, solved exactly on its segment."""
    spare = util_cap * cores - fixed_cores
    budget = spare / demand_sps if demand_sps > 0 else math.inf  # CPU seconds per sample we can spend
    rising: list[tuple[float, float]] = []
    for f, u in costs:
        rising.append((f, max(u, rising[-1][1]) if rising else u))
    pts = tuple(rising)
    if unit_cost(pts, f_ceiling) <= budget:
        return f_ceiling
    if unit_cost(pts, f_floor) > budget:
        return f_floor
    best = f_floor
    for (f0, u0), (f1, u1) in itertools.pairwise(pts):
        if u0 > budget:
            break
        best = f1 if u1 <= budget else (f0 + (f1 - f0) * (budget - u0) / (u1 - u0) if u1 > u0 else f1)
    return min(f_ceiling, max(f_floor, best))


@dataclass(frozen=True)
class Decision:
    f: float  # the FLOPs-fraction budget to serve now
    direction: int  # -1 cheaper, +1 more accurate, 0 held
    pressure: float
    reason: str


class Controller:
    """AIMD on the pressure ratio with a dead band, dwell times and a back-off memory (module docstring)."""

    def __init__(self, target_s: float, f_floor: float, f_ceiling: float, f_start: float | None = None,
                 clock: Clock = time.monotonic, tuning: Tuning | None = None, f_bottom: float | None = None) -> None:
        """``f_floor``: the cheapest point allowed (an accuracy floor's point, or the curve's cheapest);
        ``f_bottom``: the curve's cheapest point (default ``f_floor``), which sizes relief steps."""
        if not (target_s > 0 and 0 < f_floor <= f_ceiling):
            raise ValueError("need target_s > 0 and 0 < f_floor <= f_ceiling")
        if f_bottom is not None and not 0 < f_bottom <= f_floor:
            raise ValueError("need 0 < f_bottom <= f_floor")
        self.target_s = target_s
        self.floor, self.ceiling = f_floor, f_ceiling
        self.bottom = f_floor if f_bottom is None else f_bottom
        self.t = tuning or Tuning()
        self.clock = clock
        self.f = self._clip(f_ceiling if f_start is None else f_start)
        self.moves = 0
        self.pressure = 0.0
        self.reason = "engaged"
        self.last_move_t = -math.inf
        self._last_dir = 0
        self._last_down_t = -math.inf
        self._bad_f: float | None = None
        self._bad_until = -math.inf
        self._hold = self.t.hold_s
        self.util_cap = self.t.util_start  # planned moves: the utilisation the load model may fill
        self.planned = False  # whether the last step had a load model
        self.predicted_util: float | None = None  # of the budget chosen, by the load model
        self.feedback_since = -math.inf  # latencies of requests started before this are not pressure
        self._cap_moved_t = -math.inf
        self.f_latency = f_ceiling  # planned: the budget's bound for latency the load does not explain
        self.relief_moves = 0  # moves down between ticks, instead of a refusal (relieve)
        self._lat_moved_t = -math.inf

    def _clip(self, f: float) -> float:
        return min(self.ceiling, max(self.floor, f))

    def pressure_of(self, s: Signal) -> float:
        share = 1.0 if s.planned else self.t.queue_share  # planned: only a backlog past the whole target
        x = s.queue_delay_s / (share * self.target_s)
        if s.p99_s is not None:
            x = max(x, s.p99_s / self.target_s)
        if s.planned:  # refusals are the plan's own (admission at the cap): counting them would cut the cap,
            # which admits less, which refuses more (measured: a spiral down to 40 % of capacity). A pegged CPU
            # is: the model was optimistic, and the backlog in the sockets is invisible to the latencies.
            if s.cpu_util is not None and s.cpu_util >= SATURATED * s.cores:
                x = max(x, 1.1 * self.t.plan_high)
            return x
        if s.rejected and s.rejected >= max(1.0, self.t.reject_share * (s.samples + s.rejected)):
            x = max(x, self.t.reject_pressure)  # a stray refusal among hundreds of answers is not one
        return x

    def step(self, s: Signal) -> Decision:
        """One tick: maybe move ``f``; returns the budget, the direction and why."""
        now = self.clock()
        x = self.pressure = self.pressure_of(s)
        self.planned = s.planned
        if s.planned:
            d = self._plan(now, x, s)
            self.reason = d.reason
            return d
        self.predicted_util = None
        if x > self.t.high:
            d = self._down(now, x)
        elif x < self.t.low:
            d = self._up(now, x)
        else:
            d = self._hold_at(x, f"pressure {x:.2f} inside the dead band [{self.t.low}, {self.t.high}]")
        self.reason = d.reason
        return d

    def _plan(self, now: float, x: float, s: Signal) -> Decision:
        """Planned moves (module docstring): adapt the cap on pressure, then the budget the load affords."""
        assert s.demand_sps is not None and s.costs
        t, demand, cores, fixed = self.t, s.demand_sps, max(s.cores, 1e-9), max(0.0, s.fixed_cores)
        floor_util = (fixed + demand * unit_cost(s.costs, self.floor)) / cores
        overloaded = floor_util > self.util_cap
        why_cap = ""
        if x > t.plan_high and self.util_cap > t.util_min and now - self._cap_moved_t >= t.down_dwell_s:
            old = self.util_cap
            self.util_cap = max(t.util_min, self.util_cap * min(0.95, max(t.cap_cut, t.plan_high / x)))
            self._cap_moved_t = self.feedback_since = now
            why_cap = f"pressure {x:.2f} > {t.plan_high}: utilisation cap {old:.2f} -> {self.util_cap:.2f}; "
        elif x < t.plan_low and self.util_cap < t.util_max and now - self._cap_moved_t >= t.cap_up_dwell_s:
            old = self.util_cap
            self.util_cap = min(t.util_max, self.util_cap + t.cap_up)
            self._cap_moved_t = now
            why_cap = f"pressure {x:.2f} < {t.plan_low}: utilisation cap {old:.2f} -> {self.util_cap:.2f}; "
        if x > t.plan_high and self.util_cap <= t.util_min and now - self._lat_moved_t >= t.down_dwell_s:
            # the cap is spent and the p99 is still over: latency the load does not explain (a target near
            # what one request takes); only a cheaper point helps
            cut = min(t.min_cut, max(t.max_cut, t.plan_high / x))
            self.f_latency = max(self.floor, min(self.f_latency, self.f) * cut)
            self._lat_moved_t = self.feedback_since = now
            why_cap = f"pressure {x:.2f} with the cap at its minimum: latency bound f <= {self.f_latency:.3f}; "
        elif x < t.plan_low and self.f_latency < self.ceiling and now - self._lat_moved_t >= t.cap_up_dwell_s:
            self.f_latency = min(self.ceiling, self.f_latency + 0.25 * (self.ceiling - self.floor))
            self._lat_moved_t = now
        f = min(self.f_latency, affordable(s.costs, demand, cores, self.util_cap, self.floor, self.ceiling, fixed))
        self.predicted_util = (fixed + demand * unit_cost(s.costs, f)) / cores
        load = (f"({fixed:.2f} + {demand:.0f} samples/s x {1000 * unit_cost(s.costs, f):.2f} ms) / {cores:g} "
                f"core(s) = utilisation {self.predicted_util:.2f}")
        if overloaded:
            load += f"; even the floor needs {floor_util:.2f} > cap {self.util_cap:.2f}: overload, shedding"
        step = abs(f - self.f)
        if step <= t.min_move * max(self.ceiling - self.floor, 1e-12) and not (f in (self.floor, self.ceiling)
                                                                               and step > 0):
            return Decision(self.f, 0, x, f"{why_cap}holding f={self.f:.3f}: {load}")
        direction = 1 if f > self.f else -1
        old_f = self.f
        self.f = f
        self._moved(now, direction)
        return Decision(f, direction, x, f"{why_cap}f {old_f:.3f} -> {f:.3f}: {load}")

    def relieve(self, demand_sps: float | None = None) -> Decision:
        """Between ticks, when a request would be refused (admission's ``relieve``): a cheaper budget now,
        ``max(floor, bottom + relief_cut * (f - bottom))``. The step is sized on the whole curve (``bottom``: its
        cheapest point), so an accuracy floor bounds how far relief goes, not how large its steps are (sized on
        the floor, each relief gave half as much room with the benchmark's floor, and 1x load was refused 4-8x
        as often with the floor as without: measured). A small step (a quarter of the way down): a Poisson burst
        at a load the point carries costs a moment of a slightly cheaper point, and a real step of load is
        met by a few reliefs and then by the next planned tick, which the runtime feeds
        the new arrival rate (sizing the relief from a rate measured over a few tens of milliseconds instead
        sent the budget to the floor on every burst: measured). Never up; direction 0 at the floor.
        ``demand_sps``: the arrival rate that prompted it, for the reason only."""
        t = self.t
        if self.f <= self.floor + 1e-12:
            return Decision(self.f, 0, self.pressure, self.reason)
        f = max(self.floor, self.bottom + t.relief_cut * (self.f - self.bottom))  # f > floor here: a move down
        if self.f - f <= t.min_move * max(self.ceiling - self.bottom, 1e-12):
            f = self.floor
        old, self.f = self.f, f
        self.relief_moves += 1
        self._moved(self.clock(), -1)
        rate = "" if demand_sps is None else f" ({demand_sps:.0f} samples/s arriving)"
        self.reason = f"relief: a request would have been refused at f={old:.3f}; f -> {f:.3f} at once{rate}"
        return Decision(f, -1, self.pressure, self.reason)

    def _hold_at(self, x: float, why: str) -> Decision:
        return Decision(self.f, 0, x, why)

    def _down(self, now: float, x: float) -> Decision:
        if self.f <= self.floor:
            return self._hold_at(x, f"pressure {x:.2f} over {self.t.high} but at the floor f={self.floor:.3f}")
        if now - self.last_move_t < self.t.down_dwell_s:
            return self._hold_at(x, f"pressure {x:.2f}: waiting out the dwell time before cutting")
        if now - self._last_down_t > 2 * self.t.max_hold_s:
            self._hold = self.t.hold_s  # long quiet: forget the back-off
        failed_probe = self._last_dir > 0 and now - self.last_move_t <= self.t.probe_window_s
        bad = self.f
        if failed_probe:
            self._hold = min(2 * self._hold, self.t.max_hold_s)
            if self._bad_f is not None:
                bad = min(bad, self._bad_f)  # the lower point known too slow is still too slow
        self._bad_f, self._bad_until = bad, now + self._hold
        cut = min(self.t.min_cut, max(self.t.max_cut, (self.t.high / x) ** self.t.gain))
        old = self.f
        self.f = self._clip(self.f * cut)
        self._moved(now, -1)
        self._last_down_t = now
        why = (f"pressure {x:.2f} > {self.t.high}: cut f {old:.3f} -> {self.f:.3f}"
               + (f" (failed probe; hold {self._hold:.0f} s)" if failed_probe else ""))
        return Decision(self.f, -1, x, why)

    def _up(self, now: float, x: float) -> Decision:
        if self.f >= self.ceiling:
            return self._hold_at(x, f"pressure {x:.2f} < {self.t.low}: at full accuracy")
        if now - self.last_move_t < self.t.up_dwell_s:
            return self._hold_at(x, f"pressure {x:.2f}: waiting out the dwell time before raising")
        step = self.t.up_step * (self.ceiling - self.floor)
        new = min(self.ceiling, self.f + step)
        if self._bad_f is not None and now < self._bad_until:
            new = min(new, self._bad_f - step / 2)
            if new <= self.f + 1e-9:
                return self._hold_at(x, f"pressure {x:.2f} < {self.t.low}, but f={self._bad_f:.3f} was too slow; "
                                        f"holding for {self._bad_until - now:.0f} s more")
        old = self.f
        self.f = new
        self._moved(now, +1)
        return Decision(self.f, +1, x, f"pressure {x:.2f} < {self.t.low}: raise f {old:.3f} -> {self.f:.3f}")

    def _moved(self, now: float, direction: int) -> None:
        self.moves += 1
        self.last_move_t = now
        self._last_dir = direction
        if not self.planned:
            self.feedback_since = now  # AIMD: the latencies before a move are of another point


@dataclass(frozen=True)
class WindowStats:
    count: int  # answered requests considered
    p99_s: float | None
    rejected: int


class LatencyWindow:
    """A ring buffer of recent inference requests: ``(end time, latency, ok)``.

    Fed on the event loop (one ``record`` per answered request); read by the runtime loop on the same loop,
    so it needs no lock. Old entries fall off the end (``maxlen``) and out of the time window.
    """

    def __init__(self, maxlen: int = 8192, clock: Clock = time.monotonic) -> None:
        self._buf: deque[tuple[float, float, bool]] = deque(maxlen=maxlen)
        self.clock = clock

    def record(self, latency_s: float, ok: bool, now: float | None = None) -> None:
        self._buf.append((self.clock() if now is None else now, latency_s, ok))

    def __len__(self) -> int:
        return len(self._buf)

    def stats(self, window_s: float, since: float = -math.inf, min_samples: int = 20) -> WindowStats:
        """Requests that ended in the last ``window_s`` and started at or after ``since``: their p99
        (None under ``min_samples`` answers) and how many were refused (non-2xx)."""
        now = self.clock()
        lat: list[float] = []
        rejected = 0
        for end, seconds, ok in reversed(self._buf):
            if end < now - window_s:
                break
            if end - seconds < since:
                continue
            if ok:
                lat.append(seconds)
            else:
                rejected += 1
        p99 = float(np.percentile(lat, 99)) if len(lat) >= min_samples else None
        return WindowStats(len(lat), p99, rejected)
