"""Admission control under a latency target: refuse at once what could not be answered in time.

Pure logic, no HTTP, no disk, no clock (the caller passes the queue's state). The autopilot's runtime
(:mod:`service.serving.autopilot_runtime`) keeps it configured (the target, the measured seconds per sample of
the point serving now); the inference pipeline asks :meth:`Admission.check` before it decodes anything.

**Service rate.** ``s`` = seconds per sample of the serving point at the batch size in use, measured: the
batcher's busy time over the samples it ran (:class:`CostEstimator`), so ``capacity = 1 / s`` samples per
second in this process. Between measurements the estimate follows the point. On the time axis the point's
``timing.json`` milliseconds are this machine's, so ``s(point) = ms(point) / 1000 + c`` with ``c`` the
measured per-sample cost the network's ms leave out (the runner's Python work, batching, outcome assembly;
an EWMA): additive, because that work hardly depends on the point (a proportional model, fitted at a cheap
point whose few microseconds of network time carry a millisecond of overhead, priced the full network at
50x its time and kept the autopilot at its cheapest point: measured). Untimed (FLOPs fractions, which say
nothing about seconds): ``s(point) = k * fraction(point)`` with ``k`` observed.

**The rule.** A request of ``n`` samples arriving now would be answered after about::

    expected(n) = overhead + max_delay + running_left + (queued + n + joiners) * s
    joiners     = min(B - ((queued + n - 1) mod B + 1), arrival_rate * running_left)

(``running_left``: what the batch in the network still needs; ``queued``: samples waiting before it; ``B``:
the batcher's largest batch; ``joiners``: requests arriving behind this one before its batch starts join that
batch and delay its answer: at most the room left in it, and what arrives (at the measured arrival rate)
while the running batch finishes; ``overhead``: HTTP parsing,
decoding and encoding, a fixed :data:`HTTP_OVERHEAD_MS`). ``s`` is measured at the batch sizes the load makes,
so small batches at light load and full ones under overload are both priced as they run. (Counting the
request's own batch as always full, as a first version did, priced a lightly loaded server at ``B * s`` per
request and shed 40 % of a half-capacity load on the default cascade: measured, bench.autopilot.) It is admitted when
``expected(n) <= headroom * target`` or when nothing is queued or running (an idle server: refusing its
one request would help nobody; a target that even one request cannot meet is refused when set), and refused
otherwise (``Retry-After``: the seconds until the backlog would have drained to that bound, at least 1).
**Rate.** A queue check alone cannot see requests that wait to be read: on an overloaded process the event
loop is itself the bottleneck, and what waits in the sockets is invisible to the batcher. So while engaged the
admitted samples also pass a token bucket (:class:`TokenBucket`) filled at ``rate_sps``, the runtime's measured
capacity of the serving point times a utilisation below 1 (the whole process's CPU per sample, HTTP included),
holding :data:`BURST_S` seconds of that rate (at least one batch): under a load past capacity the excess is
refused at the rate it exceeds it, before the loop falls behind, while the queue check keeps the latency of a
burst. Refusals are counted by rule (``shed_by_queue``, ``shed_by_rate``).

**Relief before refusal.** A request that would be refused is first offered to the caller's ``relieve``
(the autopilot's runtime: move to a cheaper point at once, when one is allowed, instead of at its next
tick); if that makes the service cheaper, the request is judged again at the new point's price. The
samples queued before it will run at that point too, so the expected answer time shrinks with it. A step
of load, or a burst, then costs accuracy for a moment instead of refusals: refusing is for a load that
even the floor cannot answer in time.

**Tail allowance.** The target is a p99: up to 1 % of the answers may be later than it. A request the rule
would refuse whose expected answer time is past the bound but within the target itself (and that the token
bucket admits) may instead spend an allowance that every request admitted by the rule fills by ``tail_budget``
(default 0.5 %, half of what a p99 allows) and that holds at most ``tail_burst`` requests: so at most that
share of the answered requests is admitted on the estimate's edge, and an occasional burst at a load the
point carries is answered a little late instead of refused. (Filled by every request asked about, as a first
version did, it admitted 1.6 % of the answered on the edge in a 3x step that refused two requests in three,
whose answered p99 passed the target, 65 vs 55 ms: measured.) On a 2-core EPYC, 290 requests/s (1x), a
60 ms target: admitted requests with an expected 40-48 ms were answered in 31 ms on average (90th
percentile 48 ms), those with 48-60 ms (admitted by a relief) in 37 ms (at most 61 ms), while 28 of 8,667
requests were refused for an expected time past 48 ms. A failure is worse for its user than a late answer:
the allowance keeps refusals for a backlog that would take the answered p99 past the target. Counted as
``tail_admitted``.

So the queue bound follows from the target and the measured throughput,
``queued <= (headroom * target - overhead - max_delay) / s - 1`` (an idle network), and no admitted request is held
past the target only to fail. With no target (autopilot off), or no estimate yet, everything is admitted (the
batcher's fixed queue bound still applies).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from service.serving.batcher import BatcherError

BURST_S = 0.25  # the token bucket holds this many seconds of its rate
TAIL_BUDGET = 0.005  # share of requests that may be admitted past the bound, within the target (docstring)
TAIL_BURST = 8.0  # ... at most this many at once
HTTP_OVERHEAD_MS = 2.0  # a request's time outside the network (parse, decode, encode), fixed, at batch 1


class Shed(BatcherError):
    """Refused on arrival by admission control: it could not be answered within the latency target."""

    code = "shed"
    default_message = "shed: the server cannot answer this request within its latency target now; retry shortly"

    def __init__(self, message: str | None = None, retry_after: int = 1, by_rate: bool = False,
                 expected_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.by_rate = by_rate  # refused by the token bucket (else by the expected answer time)
        self.expected_s = expected_s  # the expected answer time that refused it (by the queue rule)


@dataclass(frozen=True)
class AdmissionTuning:
    headroom: float = 0.8  # admit when the expected answer time is at most this share of the target
    http_overhead_s: float = HTTP_OVERHEAD_MS / 1000.0
    tail_budget: float = TAIL_BUDGET  # the tail allowance (module docstring); 0 turns it off
    tail_burst: float = TAIL_BURST

    def __post_init__(self) -> None:
        if not 0 < self.headroom <= 1 or self.http_overhead_s < 0:
            raise ValueError("need 0 < headroom <= 1 and http_overhead_s >= 0")
        if not 0 <= self.tail_budget < 0.01 or self.tail_burst < 0:
            raise ValueError("need 0 <= tail_budget < 0.01 (a p99's budget) and tail_burst >= 0")


class TokenBucket:
    """Admit at most ``rate`` samples per second on average, ``burst`` at once; the clock is the caller's."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, max(1.0, burst)
        self.tokens, self.t = self.burst, now

    def reset(self, rate: float, burst: float) -> None:
        """A new rate and burst. The tokens in hand scale with the rate: a token is a sample's share of the
        CPU at the old rate's price, so a point twice as cheap turns what was saved into twice the samples
        (and a dearer one into fewer) at once, not only as new tokens arrive."""
        old = self.rate
        self.rate, self.burst = rate, max(1.0, burst)
        scaled = self.tokens * (rate / old) if old > 0 else self.tokens
        self.tokens = min(scaled, self.burst)

    def take(self, n: int, now: float) -> bool:
        """Take ``n`` tokens when there are that many (True), else leave them (False)."""
        if now > self.t:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def wait_s(self, n: int) -> float:
        """Seconds until ``n`` tokens are there."""
        return max(0.0, (n - self.tokens) / self.rate) if self.rate > 0 else math.inf


class Admission:
    """The admission rule of the module docstring, plus counters of what it admitted and refused."""

    def __init__(self, tuning: AdmissionTuning | None = None) -> None:
        self.t = tuning or AdmissionTuning()
        self.target_s: float | None = None
        self.per_sample_s: float | None = None
        self.max_delay_s = 0.0
        self.max_batch = 1
        self.arrival_rate = 0.0  # samples per second arriving now (the runtime's measurement)
        self.checked = 0  # requests asked about (admitted + shed), cumulative
        self.checked_samples = 0  # their samples
        self.shed = 0  # requests refused, cumulative
        self.shed_samples = 0
        self.shed_by_queue = 0  # refused by the expected answer time
        self.shed_by_rate = 0  # refused by the token bucket
        self.relieved = 0  # would-be refusals the caller's ``relieve`` made cheaper (check's docstring)
        self.relieved_admitted = 0  # ... and that were then admitted
        self.tail_admitted = 0  # would-be refusals admitted on the tail allowance (module docstring)
        self.tail_allowance = 0.0  # requests that may be admitted so; fills by tail_budget a request
        self.rate_sps: float | None = None  # the token bucket's rate (None: no rate limit)
        self.bucket: TokenBucket | None = None

    @property
    def active(self) -> bool:
        return self.target_s is not None and self.per_sample_s is not None and self.per_sample_s > 0

    def configure(self, target_s: float | None, per_sample_s: float | None, max_delay_s: float = 0.0,
                  max_batch: int = 1, arrival_rate: float | None = None) -> None:
        """``target_s`` None turns shedding off; ``per_sample_s`` None: no estimate yet (admit all);
        ``arrival_rate`` (samples/s) None: assume arrivals at the service rate (a busy server)."""
        self.target_s, self.per_sample_s, self.max_delay_s = target_s, per_sample_s, max(0.0, max_delay_s)
        self.max_batch = max(1, int(max_batch))
        if arrival_rate is not None:
            self.arrival_rate = max(0.0, float(arrival_rate))
        elif per_sample_s:
            self.arrival_rate = 1.0 / per_sample_s
        if target_s is None:
            self.set_rate(None, 0.0)

    def set_rate(self, rate_sps: float | None, now: float) -> None:
        """The token bucket's rate in samples per second (None or not positive: no rate limit); it holds
        :data:`BURST_S` seconds of that rate (at least one batch)."""
        if rate_sps is None or not rate_sps > 0 or self.target_s is None:
            self.rate_sps, self.bucket = None, None
            return
        burst = max(float(self.max_batch), rate_sps * BURST_S)
        self.rate_sps = rate_sps
        if self.bucket is None:
            self.bucket = TokenBucket(rate_sps, burst, now)
        else:
            self.bucket.reset(rate_sps, burst)

    def bound_s(self) -> float | None:
        """The longest expected answer time admitted: ``headroom * target`` (None: off)."""
        return None if self.target_s is None else self.t.headroom * self.target_s

    def expected_s(self, queued: int, running_left_s: float, n: int) -> float:
        s, b = self.per_sample_s or 0.0, self.max_batch
        running = max(0.0, running_left_s)
        room = b - ((queued + n - 1) % b + 1)  # places left in this request's batch
        joiners = min(room, self.arrival_rate * (running + self.max_delay_s))
        work = (queued + n + joiners) * s
        return self.t.http_overhead_s + self.max_delay_s + running + work

    def max_queued(self) -> int | None:
        """The queue bound in samples for one more 1-sample request (None: off)."""
        if not self.active:
            return None
        assert self.target_s is not None and self.per_sample_s is not None
        room = self.t.headroom * self.target_s - self.t.http_overhead_s - self.max_delay_s
        return max(0, math.floor(room / self.per_sample_s) - 1)

    def check(self, queued: int, running_left_s: float, n: int, now: float | None = None,
              relieve: Callable[[], bool] | None = None) -> None:
        """Admit (return) or raise :class:`Shed` with a ``Retry-After`` of the seconds until the backlog
        would fit the bound again (at least 1). Counts both. ``now`` (the caller's clock): also pass the
        token bucket, when a rate is set. ``relieve``: called once when the request would be refused; when it
        returns True the service got cheaper (the caller moved to a cheaper point and reconfigured this
        object), and the request is judged again, once. A request still refused by the queue rule may then
        be admitted on the tail allowance (module docstring)."""
        self.checked += 1
        self.checked_samples += n
        if not self.active:
            return
        shed = self._verdict(queued, running_left_s, n, now)
        if shed is not None and relieve is not None and relieve():
            self.relieved += 1
            shed = self._verdict(queued, running_left_s, n, now)
            if shed is None:
                self.relieved_admitted += 1
        if shed is None:
            self.tail_allowance = min(self.t.tail_burst, self.tail_allowance + self.t.tail_budget)
            return
        if self._tail_admit(shed, n, now):
            return
        self._count_shed(n, by_rate=shed.by_rate)
        raise shed

    def _tail_admit(self, shed: Shed, n: int, now: float | None) -> bool:
        """Admit a request the queue rule refused on the tail allowance (module docstring): its expected answer
        time within the target, a whole request's worth of allowance in hand, and the token bucket's word."""
        e, target = shed.expected_s, self.target_s
        if shed.by_rate or e is None or target is None or e > target or self.tail_allowance < 1.0 - 1e-9:
            return False
        if self.bucket is not None and now is not None and not self.bucket.take(n, now):
            return False
        self.tail_allowance -= 1.0
        self.tail_admitted += 1
        return True

    def _verdict(self, queued: int, running_left_s: float, n: int, now: float | None) -> Shed | None:
        """None: admitted (the bucket's tokens taken); else the refusal (nothing counted)."""
        if not self.active:
            return None
        bound = self.bound_s()
        assert bound is not None
        expected = self.expected_s(queued, running_left_s, n)
        idle = queued == 0 and running_left_s <= 0
        if expected <= bound or idle:  # in time, or an idle server: refusing its one request would help nobody
            bucket = self.bucket  # (but requests admitted and not yet queued look idle: the bucket counts them)
            if bucket is None or now is None or bucket.take(n, now):
                return None
            retry = max(1, math.ceil(bucket.wait_s(n)))
            return Shed(f"shed: {self.rate_sps:.0f} samples/s is what this process answers within the "
                        f"{1000 * (self.target_s or 0):g} ms latency target now, and more are arriving; retry after "
                        f"{retry} s", retry_after=retry, by_rate=True)
        retry = max(1, math.ceil(expected - bound))
        return Shed(f"shed: expected answer in {1000 * expected:.0f} ms, over {1000 * bound:.0f} ms "
                    f"({self.t.headroom:g} of the {1000 * (self.target_s or 0):g} ms latency target) with "
                    f"{queued} samples queued; retry after {retry} s", retry_after=retry, expected_s=expected)

    def _count_shed(self, n: int, by_rate: bool) -> None:
        self.shed += 1
        self.shed_samples += n
        if by_rate:
            self.shed_by_rate += 1
        else:
            self.shed_by_queue += 1


class CostEstimator:
    """Seconds per sample of the serving point, from the batcher's measured busy time (module docstring).

    ``observe(busy_s, samples, cost)``: the batcher ran ``samples`` in ``busy_s`` seconds of compute while a
    point of ``cost`` units per sample served; ``k`` (seconds per cost unit) is their EWMA. ``prior_k``: the
    value before any observation (``1e-3`` for costs in measured ms; None when costs are FLOPs fractions,
    which say nothing about seconds until measured).
    """

    def __init__(self, prior_k: float | None = None, alpha: float = 0.3, min_samples: int = 4,
                 additive: bool = False) -> None:
        self.k = prior_k
        self.alpha, self.min_samples = alpha, min_samples
        self.additive = additive  # costs are this machine's ms: s = cost * k + c, only c is learnt
        self.c = 0.0  # seconds per sample beyond the cost (additive mode)
        self.observations = 0

    def observe(self, busy_s: float, samples: int, cost: float | None) -> None:
        if samples < self.min_samples or busy_s <= 0 or not cost or cost <= 0:
            return
        if self.additive and self.k is not None:
            inst_c = max(0.0, busy_s / samples - self.k * cost)
            self.c = inst_c if self.observations == 0 else (1 - self.alpha) * self.c + self.alpha * inst_c
            self.observations += 1
            return
        inst = busy_s / samples / cost
        self.k = inst if self.k is None or self.observations == 0 else (1 - self.alpha) * self.k + self.alpha * inst
        self.observations += 1

    def network_s(self, cost: float | None) -> float | None:
        """``k * cost``: the network's own seconds per sample (timing.json's ms on the time axis), without the
        learnt busy time beyond it (which, on a core the event loop shares, counts the loop's work too)."""
        if self.k is None or not cost or cost <= 0:
            return None
        return self.k * cost

    def per_sample_s(self, cost: float | None) -> float | None:
        s = self.network_s(cost)
        return None if s is None else s + (self.c if self.additive else 0.0)
