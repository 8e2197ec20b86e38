"""The autopilot's controller on a fake clock, with synthetic load signals and a simulated queue.

No server, no sleeping: the clock is a number the test advances, so nothing here depends on the speed of
the machine.
"""

from __future__ import annotations

import itertools
import math

import pytest

from service.earlyexit import Profile
from service.earlyexit.hull import TargetUnreachable
from service.serving.autopilot import AutopilotConfig, Controller, LatencyWindow, Signal, Tuning
from service.serving.autopilot_runtime import bounds

TICK = 0.25
FLOOR, CEILING = 0.05, 0.85


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Queue:
    """A fluid single-server queue: service time ``a + b * f`` seconds, ``lam`` arrivals per second.
    p99 of the sojourn time is the M/M/1 one, ``ln(100) * s / (1 - rho)``, plus any backlog (``rho > 1``
    builds one, which drains when it falls below 1); the queue delay is the mean wait plus the backlog."""

    def __init__(self, a: float = 0.001, b: float = 0.004) -> None:
        self.a, self.b, self.backlog = a, b, 0.0

    def signal(self, lam: float, f: float, dt: float = TICK) -> Signal:
        s = self.a + self.b * f
        rho = lam * s
        self.backlog = max(0.0, self.backlog + (rho - 1.0) * dt)
        r = min(rho, 0.98)
        return Signal(s * math.log(100) / (1 - r) + self.backlog, s * r / (1 - r) + self.backlog, 0, 100)


def controller(clock: FakeClock, target_s: float = 0.04, start: float | None = None, **tuning) -> Controller:
    return Controller(target_s, FLOOR, CEILING, start, clock, Tuning(**tuning))


def drive(ctl: Controller, clock: FakeClock, signals) -> list[tuple[float, int]]:
    """Feed one signal per tick; returns ``(f, direction)`` after each."""
    out = []
    for s in signals:
        clock.t += TICK
        d = ctl.step(s)
        assert d.f == ctl.f
        out.append((d.f, d.direction))
    return out


def reversals(trace: list[tuple[float, int]]) -> int:
    dirs = [d for _, d in trace if d]
    return sum(1 for a, b in itertools.pairwise(dirs) if a != b)


# -- synthetic signals ---------------------------------------------------------------------------------

def test_moves_down_under_rising_delay_and_back_up_when_it_falls():
    clock = FakeClock()
    ctl = controller(clock)
    rising = [Signal(0.010 + 0.002 * i, queue_delay_s=0.001 * i, samples=100) for i in range(40)]
    trace = drive(ctl, clock, rising)
    fs = [f for f, _ in trace]
    assert fs[0] == CEILING and fs[-1] < 0.5 * CEILING
    assert all(b <= a for a, b in itertools.pairwise(fs)), "rising delay only ever cuts"
    low = drive(ctl, clock, [Signal(0.008, 0.0, 0, 100)] * 400)  # load fell: 100 s of a quiet server
    assert [d for _, d in low if d] and all(d > 0 for _, d in low if d)
    assert low[-1][0] == CEILING, "back to full accuracy once the load is gone"


def test_never_below_the_floor():
    clock = FakeClock()
    ctl = controller(clock)
    trace = drive(ctl, clock, [Signal(5.0, 5.0, rejected=50, samples=100)] * 200)
    assert min(f for f, _ in trace) == FLOOR and trace[-1][0] == FLOOR
    assert "floor" in ctl.reason


@pytest.mark.parametrize("p99", [0.026, 0.028, 0.03, 0.031])
def test_a_constant_signal_inside_the_band_never_moves(p99):
    clock = FakeClock()
    ctl = controller(clock, start=0.5)
    trace = drive(ctl, clock, [Signal(p99, 0.0, 0, 100)] * 400)
    assert all(d == 0 for _, d in trace) and ctl.f == 0.5 and ctl.moves == 0
    assert "dead band" in ctl.reason


@pytest.mark.parametrize("p99", [0.001, 0.02, 0.033, 0.05, 0.4])
def test_a_constant_signal_never_reverses(p99):
    clock = FakeClock()
    ctl = controller(clock, start=0.4)
    trace = drive(ctl, clock, [Signal(p99, 0.0, 0, 100)] * 800)
    assert reversals(trace) == 0


def test_dwell_time_limits_the_rate_of_cuts():
    clock = FakeClock()
    ctl = controller(clock, down_dwell_s=1.0)
    trace = drive(ctl, clock, [Signal(0.2, 0.0, 0, 100)] * 8)  # 2 s of pressure 5
    assert sum(1 for _, d in trace if d) == 2
    assert trace[0][0] == pytest.approx(CEILING * 0.25)  # a big overshoot cuts by the most allowed


def test_small_overshoot_cuts_a_little():
    clock = FakeClock()
    ctl = controller(clock)
    drive(ctl, clock, [Signal(0.034, 0.0, 0, 100)])  # pressure 0.85: just over `high`
    assert ctl.f == pytest.approx(CEILING * 0.9)


def test_queue_delay_alone_is_pressure():
    clock = FakeClock()
    ctl = controller(clock)
    d = drive(ctl, clock, [Signal(None, queue_delay_s=0.03, samples=3)])  # no p99 yet, queue filling
    assert d[0][1] == -1 and ctl.pressure == pytest.approx(0.03 / (0.5 * 0.04))


def test_idle_server_climbs_to_full_accuracy():
    clock = FakeClock()
    ctl = controller(clock, start=FLOOR)
    trace = drive(ctl, clock, [Signal(None, 0.0, 0, 0)] * 100)
    assert trace[-1][0] == CEILING and reversals(trace) == 0


# -- closed loop on a simulated queue -------------------------------------------------------------------

@pytest.mark.parametrize("lam", [100, 250, 400, 550, 700])
def test_settles_under_constant_load(lam):
    """Constant arrivals: after the first 30 s, no move at all for 10 minutes (no oscillation), and p99
    within the target from then on."""
    clock = FakeClock()
    ctl = controller(clock)
    q = Queue()
    trace, p99s = [], []
    for _ in range(int(630 / TICK)):
        s = q.signal(lam, ctl.f)
        clock.t += TICK
        d = ctl.step(s)
        trace.append((d.f, d.direction))
        p99s.append(s.p99_s)
    settled = int(30 / TICK)
    assert all(d == 0 for _, d in trace[settled:]), [i * TICK for i, (_, d) in enumerate(trace) if d]
    assert max(p99s[settled:]) <= 0.04
    assert FLOOR <= trace[-1][0] <= CEILING


def test_backs_off_from_a_cliff():
    """A capacity cliff: fine (pressure 0.3) up to f = 0.5, far over (1.5) above it; the dead band alone
    cannot stop an up-step from crossing it. The memory of the failed point, with a hold that doubles on
    every failed probe, keeps the probes rare: few cuts in 10 minutes, almost no time over the cliff."""
    clock = FakeClock()
    ctl = controller(clock)
    trace = []
    for _ in range(int(600 / TICK)):
        clock.t += TICK
        d = ctl.step(Signal(0.3 * 0.04 if ctl.f <= 0.5 else 1.5 * 0.04, 0.0, 0, 100))
        trace.append((d.f, d.direction))
    cuts = sum(1 for _, d in trace if d < 0)
    assert cuts <= 8, cuts  # without the memory: a cut every few seconds (~150)
    assert sum(1 for f, _ in trace if f > 0.5) <= 0.01 * len(trace)
    assert 0.4 < trace[-1][0] <= 0.5


def test_follows_a_burst_down_and_back_up():
    clock = FakeClock()
    ctl = controller(clock)
    q = Queue()
    fs = []
    for lam in [20] * 80 + [600] * 240 + [20] * 800:
        s = q.signal(lam, ctl.f)
        clock.t += TICK
        fs.append(ctl.step(s).f)
    assert fs[79] == CEILING
    burst = fs[80:320]
    assert min(burst) < 0.25 and max(burst[120:]) < 0.5  # the burst is served by cheaper points
    assert fs[-1] == CEILING  # and full accuracy returns when it ends


# -- the pieces around it ---------------------------------------------------------------------------------

def test_latency_window_percentile_since_and_rejections():
    clock = FakeClock()
    w = LatencyWindow(maxlen=100, clock=clock)
    for i in range(50):
        clock.t += 0.01
        w.record(0.001 * (i + 1), ok=True)
    w.record(0.5, ok=False)
    st = w.stats(window_s=10.0)
    assert st.count == 50 and st.rejected == 1 and st.p99_s == pytest.approx(0.04951, abs=1e-4)
    assert w.stats(window_s=10.0, min_samples=51).p99_s is None
    recent = w.stats(window_s=0.095, min_samples=1)  # only the last 10 answers ended in the window
    assert recent.count == 10
    since = w.stats(window_s=10.0, since=clock.t - 0.05, min_samples=1)  # started after a move
    assert since.count < 10 and since.rejected == 0
    for _ in range(200):
        w.record(0.001, ok=True)
    assert len(w) == 100


def _profiles() -> list[Profile]:
    pts = [(0.05, 0.5), (0.2, 0.7), (0.5, 0.85), (0.8, 0.9), (1.0, 0.89)]
    return [Profile(f"p{i}", [], f, f, a) for i, (f, a) in enumerate(pts)]


def test_bounds_floor_and_ceiling():
    assert bounds(_profiles(), None) == (0.05, 1.0)  # the full network is the ceiling
    floor, ceiling = bounds(_profiles(), 0.8)
    assert ceiling == 1.0 and floor == pytest.approx(0.2 + (0.5 - 0.2) * (0.8 - 0.7) / (0.85 - 0.7))
    floor, ceiling = bounds(_profiles(), 0.895)  # the full network (0.89) is below this floor
    assert ceiling == 0.8 and floor == pytest.approx(0.5 + (0.8 - 0.5) * (0.895 - 0.85) / (0.9 - 0.85))
    with pytest.raises(TargetUnreachable):
        bounds(_profiles(), 0.95)


@pytest.mark.parametrize("kw", [{"target_ms": 0.0}, {"target_ms": -5.0}, {"target_ms": 0.5},
                                {"target_ms": 61_000.0}, {"target_ms": float("nan")},
                                {"target_ms": 100.0, "min_accuracy": 1.5}, {"target_ms": 100.0, "mode": "bogus"}])
def test_config_rejects_absurd_values(kw):
    with pytest.raises(ValueError):
        AutopilotConfig(**kw)


def test_config_round_trip():
    c = AutopilotConfig(100.0, 0.85, "cm")
    assert AutopilotConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError):
        AutopilotConfig.from_json({"min_accuracy": 0.5})


def test_a_stray_refusal_among_many_answers_is_no_emergency_but_a_share_of_them_is():
    clock = FakeClock()
    ctl = controller(clock)
    trace = drive(ctl, clock, [Signal(0.02, 0.0, 1, 400)] * 10)  # 1 refused of 401: p99 at half the target
    assert all(d >= 0 for _, d in trace) and ctl.f == CEILING
    trace = drive(ctl, clock, [Signal(0.02, 0.0, 20, 400)] * 3)  # 5 % refused: cut
    assert any(d < 0 for _, d in trace) and ctl.f < CEILING
