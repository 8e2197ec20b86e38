"""Planned moves of the autopilot (a load model: arrival rate x CPU per sample) on a fake clock.

The load model is a simulated single core: a point at budget ``f`` costs ``u(f)`` CPU seconds per sample,
``demand`` samples arrive per second, the p99 is the M/M/1 sojourn time's at ``rho = demand * u / cores``
(infinite past 1, where admission control would shed). No server, no sleeping.
"""

from __future__ import annotations

import math

import pytest

from service.serving.admission import Admission, AdmissionTuning, Shed, TokenBucket
from service.serving.autopilot import Controller, Signal, Tuning, affordable, unit_cost

TICK = 0.25
FLOOR, CEILING = 0.1, 1.0
# CPU seconds per sample at three hull vertices: 1 ms of HTTP work plus the network's time
COSTS = ((0.1, 0.0012), (0.5, 0.0020), (1.0, 0.0030))


class FakeClock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def p99_of(demand: float, f: float, cores: float = 1.0) -> float:
    u = unit_cost(COSTS, f)
    rho = demand * u / cores
    return math.inf if rho >= 1 else u * math.log(100) / (1 - rho)


def signal(demand: float, f: float, p99: float | None = None, rejected: int = 0) -> Signal:
    return Signal(p99_of(demand, f) if p99 is None else p99, 0.0, rejected, 200, demand, COSTS, 1.0)


def run(ctl: Controller, clock: FakeClock, demand: float, seconds: float, p99: float | None = None) -> list[float]:
    out = []
    for _ in range(round(seconds / TICK)):
        clock.t += TICK
        ctl.step(signal(demand, ctl.f, p99))
        out.append(ctl.f)
    return out


def test_unit_cost_is_linear_between_vertices_and_flat_outside():
    assert unit_cost(COSTS, 0.0) == 0.0012 and unit_cost(COSTS, 2.0) == 0.0030
    assert unit_cost(COSTS, 0.3) == pytest.approx(0.0016)
    assert unit_cost(COSTS, 0.75) == pytest.approx(0.0025)


@pytest.mark.parametrize("demand", [50.0, 300.0, 400.0, 500.0, 700.0])
def test_affordable_is_the_costliest_budget_under_the_cap(demand):
    f = affordable(COSTS, demand, 1.0, 0.75, FLOOR, CEILING)
    assert FLOOR <= f <= CEILING
    if f < CEILING and f > FLOOR:
        assert demand * unit_cost(COSTS, f) == pytest.approx(0.75, rel=1e-9)  # exactly at the cap
    if f == CEILING:
        assert demand * unit_cost(COSTS, CEILING) <= 0.75
    if f == FLOOR:
        assert demand * unit_cost(COSTS, FLOOR) >= 0.75 - 1e-12  # only overload lands on the floor


def test_fixed_cpu_leaves_less_for_the_load():
    free = affordable(COSTS, 300.0, 1.0, 0.75, FLOOR, CEILING)
    busy = affordable(COSTS, 300.0, 1.0, 0.75, FLOOR, CEILING, fixed_cores=0.2)
    assert busy < free and 0.2 + 300.0 * unit_cost(COSTS, busy) == pytest.approx(0.75, rel=1e-9)


def test_affordable_on_two_cores_affords_twice_the_load():
    one = affordable(COSTS, 600.0, 1.0, 0.75, FLOOR, CEILING)
    two = affordable(COSTS, 1200.0, 2.0, 0.75, FLOOR, CEILING)
    assert one == pytest.approx(two)


def test_affordable_treats_a_dip_in_measured_cost_as_flat():
    bumpy = ((0.1, 0.0012), (0.4, 0.0025), (0.5, 0.0020), (1.0, 0.0030))
    f = affordable(bumpy, 0.75 / 0.0024, 1.0, 0.75, FLOOR, CEILING)
    assert f <= 0.4  # 0.5 is measured cheaper than 0.4 but cannot be cheaper than what it contains


def test_light_load_holds_the_ceiling():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    fs = run(ctl, clock, 0.5 * 1 / 0.003, 30)  # half the full network's capacity
    assert set(fs) == {CEILING} and ctl.planned


def test_a_step_up_moves_down_in_one_tick_and_a_step_down_moves_back_at_once():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    run(ctl, clock, 150.0, 5)
    assert ctl.f == CEILING
    clock.t += TICK
    ctl.step(signal(450.0, ctl.f, p99=0.01))  # the load triples; the latency has not seen it yet
    assert ctl.f < CEILING and 450.0 * unit_cost(COSTS, ctl.f) == pytest.approx(ctl.util_cap, rel=1e-9)
    clock.t += TICK
    ctl.step(signal(150.0, ctl.f, p99=0.01))
    assert ctl.f == CEILING  # back in the next tick: no probing, no hold


def test_pressure_cuts_the_cap_and_low_pressure_restores_it():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    demand = 0.7 / unit_cost(COSTS, 0.5)  # the model says 0.5 fits 0.75 of the core
    run(ctl, clock, demand, 2, p99=0.1)  # but the answers are twice the target: the model is optimistic
    assert ctl.util_cap < Tuning().util_start
    cut_f = ctl.f
    assert cut_f < affordable(COSTS, demand, 1.0, Tuning().util_start, FLOOR, CEILING)
    run(ctl, clock, demand, 20, p99=0.01)  # well under the band: the cap climbs back to its maximum
    assert ctl.util_cap == pytest.approx(Tuning().util_max) and ctl.f > cut_f


def test_overload_holds_the_floor_trims_the_cap_and_recovers_within_seconds():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    run(ctl, clock, 3 / 0.003, 20, p99=0.5)  # 3x the full network: even the floor cannot keep up
    assert ctl.f == FLOOR and "overload" in ctl.reason
    assert ctl.util_cap == Tuning().util_min  # the answered p99 is over: admit less (the runtime's bucket)
    fs = run(ctl, clock, 0.5 / 0.003, 20)  # the load falls back to half the full network's capacity
    first_full = next(i for i, f in enumerate(fs) if f == CEILING)
    assert first_full * TICK <= 5.0 and set(fs[first_full:]) == {CEILING}


def test_a_settled_load_settles_the_point():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    fs = run(ctl, clock, 400.0, 60)
    assert len(set(fs[-80:])) == 1  # the last 20 s: not a single move
    assert 400.0 * unit_cost(COSTS, fs[-1]) <= Tuning().util_max + 1e-9


def test_without_a_load_model_the_controller_falls_back_to_aimd():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    clock.t += TICK
    d = ctl.step(Signal(0.2, 0.0, 0, 100))
    assert not ctl.planned and d.direction == -1 and "cut f" in d.reason


# -- admission's token bucket --------------------------------------------------------------------------


def test_token_bucket_rate_and_burst():
    b = TokenBucket(rate=100.0, burst=10.0, now=0.0)
    assert sum(b.take(1, 0.0) for _ in range(20)) == 10  # the burst, then nothing
    assert not b.take(1, 0.005) and b.take(1, 0.011)  # 100/s: one token every 10 ms
    assert b.wait_s(5) == pytest.approx(0.05, abs=0.011)


def admission(rate: float) -> Admission:
    a = Admission(AdmissionTuning(headroom=0.8, http_overhead_s=0.001))
    a.configure(0.05, 0.001, max_delay_s=0.002, max_batch=32, arrival_rate=100.0)
    a.set_rate(rate, now=0.0)
    return a


def test_a_burst_past_the_bucket_is_shed_even_while_the_queue_looks_empty():
    a = admission(500.0)
    shed = 0
    for _ in range(160):  # 160 at once: none of them is queued yet when the next one is checked
        try:
            a.check(0, 0.0, 1, now=1.0)
        except Shed as exc:
            shed += 1
            assert exc.retry_after >= 1 and "samples/s" in str(exc)
    burst = max(32, 500.0 * 0.25)  # a quarter of a second of the rate, at least one batch
    assert 160 - shed == pytest.approx(burst, abs=1) and a.shed == shed and a.shed_samples == shed
    assert a.shed_by_rate == shed and a.shed_by_queue == 0  # counted by rule


def test_a_steady_load_under_the_rate_is_never_shed():
    a = admission(500.0)
    t = 0.0
    for _ in range(5000):  # 400/s, evenly spaced, against 500/s
        t += 1 / 400
        a.check(0, 0.0, 1, now=t)
    assert a.shed == 0 and a.checked_samples == 5000


def test_a_steady_load_over_the_rate_is_cut_to_the_rate():
    a = admission(500.0)
    t, admitted = 0.0, 0
    for _ in range(10000):  # 1000/s for 10 s against 500/s
        t += 1 / 1000
        try:
            a.check(0, 0.0, 1, now=t)
            admitted += 1
        except Shed:
            pass
    assert (admitted - 125) / t == pytest.approx(500.0, rel=0.02)  # the rate, after the first burst of 125


def test_no_target_no_bucket():
    a = admission(500.0)
    a.configure(None, None)
    assert a.bucket is None and a.rate_sps is None
    for _ in range(1000):
        a.check(0, 0.0, 1, now=1.0)
    assert a.shed == 0


def test_a_saturated_cpu_is_pressure_when_planned():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, CEILING, clock, Tuning())
    demand = 0.7 / unit_cost(COSTS, CEILING)  # the model says the ceiling fills 0.7 of the core
    fs = []
    for _ in range(8):  # but the CPU is pegged (the model was optimistic) while the p99 looks fine
        clock.t += TICK
        ctl.step(Signal(0.01, 0.0, 0, 200, demand, COSTS, 1.0, 0.0, cpu_util=0.99))
        fs.append(ctl.f)
    assert ctl.util_cap < Tuning().util_start and fs[-1] < CEILING
    clock.t += 5.0
    before = ctl.util_cap
    ctl.step(Signal(0.01, 0.0, 0, 200, demand, COSTS, 1.0, 0.0, cpu_util=0.5))  # not saturated: no cut
    assert ctl.util_cap >= before


def test_poisson_arrivals_at_85_percent_of_the_rate_are_not_refused():
    import numpy as np

    a = admission(500.0)
    t = 0.0
    for gap in np.random.default_rng(0).exponential(1 / 425.0, size=20000):  # 47 s of Poisson arrivals
        t += gap
        a.check(0, 0.0, 1, now=t)
    assert a.shed == 0


def test_latency_the_load_does_not_explain_bounds_the_budget_and_the_bound_lifts():
    clock = FakeClock()
    ctl = Controller(0.001, FLOOR, CEILING, CEILING, clock, Tuning())  # 1 ms: no point meets it
    fs = run(ctl, clock, 10.0, 10, p99=0.004)  # a light load, answers at 4 ms
    assert ctl.util_cap == Tuning().util_min and fs[-1] == FLOOR  # the cap is spent, then the budget is cut
    assert "latency bound" in ctl.reason or ctl.f == FLOOR
    fs = run(ctl, clock, 10.0, 6, p99=0.0005)  # the answers meet it again
    assert fs[-1] == CEILING  # a quarter of the range a second: back within 4 s


# -- relief: a cheaper point instead of a refusal -------------------------------------------------------


def test_a_relief_cuts_a_quarter_of_the_way_to_the_floor_and_never_goes_up_or_under_it():
    clock = FakeClock()
    ctl = Controller(0.05, FLOOR, CEILING, clock=clock)
    d = ctl.relieve(900.0)
    assert d.direction == -1 and d.f == pytest.approx(FLOOR + 0.75 * (CEILING - FLOOR)) == ctl.f
    assert "relief" in ctl.reason and "900 samples/s" in ctl.reason and ctl.relief_moves == 1
    for _ in range(200):
        ctl.relieve()
    assert ctl.f == FLOOR  # the last small step lands on the floor itself
    d = ctl.relieve()
    assert d.direction == 0 and ctl.f == FLOOR  # at the floor: nothing cheaper to offer
    clock.t += TICK
    ctl.step(signal(50.0, ctl.f))  # the next planned tick moves on as the load model says: back up
    assert ctl.f == CEILING


def test_with_an_accuracy_floor_relief_steps_are_sized_on_the_whole_curve_and_stop_at_the_floor():
    """The floor bounds how far relief goes, not how large its steps are: the same first step as without it."""
    bottom = FLOOR / 4
    free = Controller(0.05, bottom, CEILING, clock=FakeClock())
    floored = Controller(0.05, FLOOR, CEILING, clock=FakeClock(), f_bottom=bottom)
    assert floored.relieve().f == pytest.approx(free.relieve().f) == pytest.approx(bottom + 0.75 * (CEILING - bottom))
    seen = [floored.relieve().f for _ in range(50)]
    assert min(seen) == FLOOR and all(f >= FLOOR for f in seen)  # never under the accuracy floor
    assert floored.relieve().direction == 0
    with pytest.raises(ValueError):
        Controller(0.05, FLOOR, CEILING, f_bottom=FLOOR * 1.5)  # the curve's cheapest point cannot be above the floor


def test_relief_cut_must_be_a_share():
    with pytest.raises(ValueError):
        Tuning(relief_cut=1.0)


class Reliever:
    """A ``relieve`` that halves the seconds per sample of the admission it serves, ``times`` times."""

    def __init__(self, adm: Admission, times: int) -> None:
        self.adm, self.left, self.calls = adm, times, 0

    def __call__(self) -> bool:
        self.calls += 1
        if self.left <= 0:
            return False
        self.left -= 1
        assert self.adm.per_sample_s is not None
        self.adm.configure(self.adm.target_s, self.adm.per_sample_s / 2, self.adm.max_delay_s, self.adm.max_batch,
                           arrival_rate=self.adm.arrival_rate)
        return True


def test_a_would_be_refusal_is_judged_again_after_a_relief_and_counted_once():
    a = Admission(AdmissionTuning(headroom=0.8, http_overhead_s=0.001))
    a.configure(0.05, 0.002, max_delay_s=0.002, max_batch=32, arrival_rate=0.0)
    # 30 queued x 2 ms = 60 ms + 3 ms > 40 ms: refused at this price; at 1 ms a sample: 34 ms, admitted
    relief = Reliever(a, times=1)
    a.check(30, 0.0, 1, relieve=relief)
    assert relief.calls == 1 and a.relieved == a.relieved_admitted == 1
    assert a.checked == 1 and a.shed == 0
    # still too slow after the relief: refused (and counted) once; no relief offered: refused at once
    with pytest.raises(Shed):
        a.check(100, 0.0, 1, relieve=Reliever(a, times=1))  # 1 ms: 104 ms; 0.5 ms: 53.5 ms
    assert a.checked == 2 and a.shed == a.shed_by_queue == 1 and a.relieved == 2 and a.relieved_admitted == 1
    nothing = Reliever(a, times=0)
    with pytest.raises(Shed):
        a.check(200, 0.0, 1, relieve=nothing)
    assert nothing.calls == 1 and a.relieved == 2 and a.shed == 2
    a.check(0, 0.0, 1, relieve=nothing)  # admitted: relieve is not asked
    assert nothing.calls == 1


def test_the_bucket_converts_its_tokens_at_a_new_price():
    b = TokenBucket(rate=100.0, burst=50.0, now=0.0)
    assert sum(b.take(1, 0.0) for _ in range(40)) == 40  # 10 tokens left
    b.reset(200.0, 100.0)  # a point twice as cheap: what was saved buys twice the samples at once
    assert b.tokens == pytest.approx(20.0)
    b.reset(50.0, 25.0)  # and a dearer one fewer
    assert b.tokens == pytest.approx(5.0)
    b.reset(1000.0, 10.0)  # never past the new burst
    assert b.tokens == pytest.approx(10.0)
