"""Admission control and the measured cost per sample, without a server or a clock of their own: the queue
bound follows from the target and the measured throughput, refusals are immediate with a Retry-After, an idle
server or a disengaged autopilot refuses nothing; and a simulated queue on a fake clock keeps every admitted
request's answer time within the target under a burst no point could serve."""

from __future__ import annotations

import math

import pytest

from service.serving.admission import Admission, AdmissionTuning, CostEstimator, Shed


def engaged(target_s: float = 0.1, per_sample_s: float = 0.002, overhead_s: float = 0.0, headroom: float = 0.8,
            delay_s: float = 0.0, max_batch: int = 1, arrival_rate: float | None = None,
            tail_budget: float = 0.0) -> Admission:
    """The strict rule by default (no tail allowance: it is tested on its own below)."""
    a = Admission(AdmissionTuning(headroom=headroom, http_overhead_s=overhead_s, tail_budget=tail_budget))
    a.configure(target_s, per_sample_s, delay_s, max_batch, arrival_rate)
    return a


def test_off_without_a_target_or_an_estimate():
    a = Admission()
    for _ in range(3):
        a.check(queued=10_000, running_left_s=5.0, n=1)  # no target: everything is admitted
    a.configure(0.05, None)
    a.check(queued=10_000, running_left_s=5.0, n=1)  # a target but no estimate yet: admitted too
    assert not a.active and a.shed == 0 and a.checked == 4 and a.max_queued() is None


def test_the_queue_bound_follows_from_target_and_throughput():
    a = engaged(target_s=0.1, per_sample_s=0.002, overhead_s=0.002)
    # room = 0.8 * 100 ms - 2 ms = 78 ms of work -> 39 samples including the new one
    assert a.max_queued() == 38
    a.check(queued=38, running_left_s=0.0, n=1)
    with pytest.raises(Shed) as info:
        a.check(queued=39, running_left_s=0.0, n=1)
    err = info.value
    assert err.status == 503 and err.code == "shed" and err.headers() == {"Retry-After": "1"}
    assert "latency target" in err.message
    assert (a.checked, a.shed) == (2, 1)


def test_the_own_batch_counts_as_full():
    a = engaged(target_s=0.1, per_sample_s=0.002, max_batch=8)  # 16 ms a full batch; 80 ms allowed: 5 batches
    assert a.max_queued() == 39
    a.check(queued=39, running_left_s=0.0, n=1)  # 5 batches
    with pytest.raises(Shed):
        a.check(queued=40, running_left_s=0.0, n=1)  # its batch is the 6th


def test_the_running_batch_and_the_request_size_count():
    a = engaged(target_s=0.1, per_sample_s=0.002)
    a.check(queued=10, running_left_s=0.0, n=20)  # 60 ms <= 80 ms
    with pytest.raises(Shed):
        a.check(queued=10, running_left_s=0.03, n=20)  # 90 ms
    with pytest.raises(Shed):
        a.check(queued=10, running_left_s=0.0, n=31)  # 82 ms


def test_an_idle_server_takes_a_request_even_when_it_cannot_meet_the_target():
    a = engaged(target_s=0.001, per_sample_s=0.01)
    a.check(queued=0, running_left_s=0.0, n=1)
    with pytest.raises(Shed):
        a.check(queued=1, running_left_s=0.0, n=1)


def test_retry_after_grows_with_the_backlog():
    a = engaged(target_s=0.1, per_sample_s=0.01)
    with pytest.raises(Shed) as info:
        a.check(queued=500, running_left_s=0.0, n=1)  # 5.01 s expected, 80 ms allowed
    assert info.value.retry_after == math.ceil(5.01 - 0.08)
    assert a.shed_by_queue == 1 and a.shed_by_rate == 0  # counted by rule


def test_cost_estimator_scales_the_measured_time_between_points():
    est = CostEstimator(prior_k=1e-3)  # costs in measured ms: trusted until something is measured
    assert est.per_sample_s(4.0) == pytest.approx(0.004)
    est.observe(busy_s=0.2, samples=100, cost=4.0)  # 2 ms a sample where timing.json said 4: k = 0.5e-3
    assert est.per_sample_s(4.0) == pytest.approx(0.002)
    assert est.per_sample_s(1.0) == pytest.approx(0.0005)  # a point 4x cheaper on the time axis
    est.observe(busy_s=0.01, samples=2, cost=4.0)  # too few samples: ignored
    assert est.per_sample_s(4.0) == pytest.approx(0.002)
    flops = CostEstimator(prior_k=None)  # FLOPs fractions say nothing about seconds until measured
    assert flops.per_sample_s(0.5) is None
    flops.observe(busy_s=0.3, samples=100, cost=0.5)
    assert flops.per_sample_s(1.0) == pytest.approx(0.006)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(arrival_gap_s: float, per_sample_s: float, target_s: float, duration_s: float,
             admission: Admission | None) -> tuple[list[float], int]:
    """One worker serving requests of one sample in arrival order (batches of up to 32), arrivals every
    ``arrival_gap_s`` on a fake clock. Returns (answer times of admitted requests, how many were shed)."""
    clock = FakeClock()
    queue: list[float] = []  # arrival times waiting
    busy_until, running, latencies, shed = 0.0, [], [], 0
    next_arrival = 0.0
    step = min(arrival_gap_s, per_sample_s) / 4
    while clock.t < duration_s:
        if running and clock.t >= busy_until:
            latencies += [busy_until - t0 for t0 in running]
            running = []
        if not running and queue:
            running, queue = queue[:32], queue[32:]
            busy_until = clock.t + len(running) * per_sample_s
        if clock.t >= next_arrival:
            next_arrival += arrival_gap_s
            left = max(0.0, busy_until - clock.t) if running else 0.0
            try:
                if admission is not None:
                    admission.check(len(queue), left, 1)
                queue.append(clock.t)
            except Shed:
                shed += 1
        clock.t += step
    return latencies, shed


def test_under_a_burst_admitted_requests_keep_the_target_and_the_excess_is_shed():
    per, target = 0.0005, 0.05  # 2000 samples/s of capacity (16 ms a full batch of 32), 50 ms target
    # 3x overload (6000/s): without admission control the queue grows without bound
    lat, _ = simulate(1 / 6000, per, target, 2.0, None)
    assert max(lat) > 10 * target
    lat, shed = simulate(1 / 6000, per, target, 2.0, engaged(target, per, max_batch=32, arrival_rate=6000))
    assert max(lat) <= target  # every admitted request answered within the target
    assert len(lat) >= 0.9 * 2000 * 2.0 - 64  # and the server stays busy: answered ~ capacity
    assert shed >= 0.5 * 12000  # about two of every three refused at once


def test_below_capacity_nothing_is_shed():
    lat, shed = simulate(1 / 1000, 0.0005, 0.05, 2.0, engaged(0.05, 0.0005, max_batch=32, arrival_rate=1000))
    assert shed == 0 and max(lat) <= 0.05


def test_half_load_is_never_shed_even_when_a_full_batch_would_miss_the_target():
    """The default cascade's case: 2.8 ms a sample on one core, so a full batch of 32 takes 90 ms, more than
    0.8 of an 85 ms target; at half the capacity batches stay small and every request is answered in time
    (pricing each request's batch as full, as a first version did, shed 40 % of such a load)."""
    per, target = 0.0028, 0.085
    lat, shed = simulate(2 * per, per, target, 3.0, engaged(target, per, max_batch=32, arrival_rate=0.5 / per))
    assert shed == 0 and max(lat) <= target
    lat, shed = simulate(per / 3, per, target, 3.0, engaged(target, per, max_batch=32, arrival_rate=3 / per))
    assert shed > 0 and max(lat) <= target


def test_the_tail_allowance_admits_a_few_past_the_bound_but_never_past_the_target():
    a = engaged(target_s=0.1, per_sample_s=0.002, tail_budget=0.005)  # bound 80 ms; one per 200 admitted
    for _ in range(199):
        a.check(queued=0, running_left_s=0.001, n=1)
    with pytest.raises(Shed):  # 82 ms > 80 ms and 199 x 0.5 % < one request's worth: refused
        a.check(queued=40, running_left_s=0.0, n=1)
    assert a.tail_allowance == pytest.approx(0.995)  # a refusal fills nothing
    a.check(queued=0, running_left_s=0.001, n=1)  # the 200th admitted: one request's worth
    a.check(queued=40, running_left_s=0.0, n=1)  # admitted on the allowance, spent
    assert a.tail_admitted == 1 and a.shed == a.shed_by_queue == 1
    with pytest.raises(Shed):  # spent: refused again
        a.check(queued=40, running_left_s=0.0, n=1)
    for _ in range(400):
        a.check(queued=0, running_left_s=0.001, n=1)
    with pytest.raises(Shed):  # 122 ms: past the target itself, the allowance never covers it
        a.check(queued=60, running_left_s=0.0, n=1)
    a.check(queued=45, running_left_s=0.0, n=1)  # 92 ms, within the target: admitted on the allowance
    assert a.tail_admitted == 2 and a.shed == 3
    assert a.tail_allowance == pytest.approx(1.0)  # two requests' worth from 400 admitted, one spent


def test_the_tail_allowance_fills_at_most_to_its_burst_and_never_passes_the_token_bucket():
    a = engaged(target_s=0.1, per_sample_s=0.002, tail_budget=0.005)
    a.tail_allowance = 100.0
    a.check(queued=0, running_left_s=0.001, n=1)
    assert a.tail_allowance == pytest.approx(a.t.tail_burst)
    a.set_rate(100.0, now=0.0)  # a bucket of 25 samples
    a.bucket.tokens = 0.0  # type: ignore[union-attr]
    with pytest.raises(Shed) as info:  # over the bound and no token: the allowance does not bypass the bucket
        a.check(queued=40, running_left_s=0.0, n=1, now=0.0)
    assert not info.value.by_rate and a.tail_admitted == 0 and a.tail_allowance >= 1.0
    with pytest.raises(Shed) as info:
        a.check(queued=0, running_left_s=0.001, n=1, now=0.0)  # in time but no token: refused by rate
    assert info.value.by_rate and a.tail_admitted == 0


def test_under_a_burst_the_tail_allowance_keeps_the_p99_within_the_target():
    per, target = 0.0005, 0.05
    strict = engaged(target, per, max_batch=32, arrival_rate=6000)
    _, strict_shed = simulate(1 / 6000, per, target, 2.0, strict)
    a = engaged(target, per, max_batch=32, arrival_rate=6000, tail_budget=0.005)
    lat, shed = simulate(1 / 6000, per, target, 2.0, a)
    late = sum(1 for x in lat if x > target)
    assert 0 < a.tail_admitted <= 0.005 * len(lat) + a.t.tail_burst  # a share of the answered, not the asked
    assert abs(shed - strict_shed) <= a.tail_admitted  # overloaded, each takes a later request's place in the queue
    assert late <= a.tail_admitted and late <= 0.01 * len(lat)  # the p99 holds
    assert max(lat) <= 1.1 * target  # and the late ones are late by little
