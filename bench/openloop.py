"""An open-loop load generator: arrivals at a fixed rate, whatever the server does.

:mod:`bench.loadgen` is closed-loop (``N`` clients, each waits for its answer before the next request), so a
slow server is sent less work and its latency looks better than its users would see. Here request ``i`` is
*scheduled* at a time fixed in advance and sent then on a free keep-alive connection (a new one when all are
busy, up to ``max_connections``); its latency is measured from the scheduled time, so a generator or server
that falls behind shows up in the latency (no coordinated omission). Every answer is checked against its
label by the same :class:`~bench.loadgen.Target` readers as the closed-loop generator.

Schedules (:func:`arrival_times`, :func:`segment_schedule`): ``"uniform"`` spaces arrivals ``1 / rate`` apart
(request ``i`` at ``i / rate``); ``"poisson"`` draws exponential gaps of mean ``1 / rate`` from a seeded
generator (a Poisson process: the same seed gives the same times). A piecewise-constant rate (a step load)
is a Poisson process restarted at each step, which is exact for a memoryless process.

Only loopback URLs; every run is bounded in time (``duration_s`` of arrivals plus ``timeout_s`` to drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.images import ImageSet
from bench.loadgen import (
    Target,
    _counts,
    _early_exit,
    _one,
    _Record,
    _run,
    _server_side,
    _states,
    check_loopback,
    latency_summary,
)
from bench.rawhttp import RawClient, RawConnectionError


@dataclass
class Timed:
    """One request of an open-loop run: when it was due, how late the generator sent it, what came back."""

    due: float  # seconds after the run's start
    late_s: float
    record: _Record


ARRIVALS = ("uniform", "poisson")


def arrival_times(rate: float, duration_s: float, kind: str = "poisson", seed: int = 0,
                  start_s: float = 0.0) -> np.ndarray:
    """Scheduled send times (seconds, ascending) in ``[start_s, start_s + duration_s)`` at ``rate`` per second.

    ``uniform``: ``start_s + i / rate`` for ``i < rate * duration_s`` (at least one); ``poisson``: cumulative
    sums of exponential gaps of mean ``1 / rate`` drawn from ``numpy.random.default_rng(seed)`` (the count is
    Poisson-distributed with mean ``rate * duration_s``)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be positive")
    if kind == "uniform":
        return start_s + np.arange(max(1, int(rate * duration_s)), dtype=np.float64) / rate
    if kind != "poisson":
        raise ValueError(f"unknown arrival process {kind!r} (one of {ARRIVALS})")
    rng = np.random.default_rng(seed)
    expected = rate * duration_s
    out: list[np.ndarray] = []
    t = 0.0
    while True:  # draw in chunks until past the end (bounded: each chunk covers ~expected arrivals)
        gaps = rng.exponential(1.0 / rate, size=int(expected + 10 * np.sqrt(expected) + 16))
        times = t + np.cumsum(gaps)
        out.append(times[times < duration_s])
        if times[-1] >= duration_s:
            break
        t = float(times[-1])
    return start_s + np.concatenate(out)


def segment_schedule(segments: list[tuple[float, float]], kind: str = "poisson", seed: int = 0) -> np.ndarray:
    """Scheduled send times of consecutive ``(rate, duration_s)`` steps (segment ``k`` seeded ``seed + k``)."""
    parts, start = [], 0.0
    for k, (rate, duration) in enumerate(segments):
        parts.append(arrival_times(rate, duration, kind, seed + k, start))
        start += duration
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class Poll:
    """One ``GET`` of a status path during a run: when (seconds after the start) and the JSON (None: failed)."""

    t: float
    body: Any


async def _open_loop(base_url: str, target: Target, images: ImageSet, rate: float, duration_s: float,
                     offset: int, timeout_s: float, max_connections: int, arrivals: str = "uniform",
                     seed: int = 0) -> tuple[list[Timed], float]:
    dues = arrival_times(rate, duration_s, arrivals, seed)
    timed, _, wall = await _scheduled(base_url, target, images, dues, offset, timeout_s, max_connections)
    return timed, wall


async def _poller(base_url: str, path: str, interval_s: float, t0: float, polls: list[Poll],
                  stop: asyncio.Event, timeout_s: float) -> None:
    client = RawClient(base_url, timeout_s)
    try:
        while not stop.is_set():
            t = time.perf_counter() - t0
            try:
                r = await client.request("GET", path)
                polls.append(Poll(t, r.json() if r.status_code == 200 else None))
            except (RawConnectionError, TimeoutError, ValueError):
                polls.append(Poll(t, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.perf_counter() - t0 - t)))
    finally:
        await client.close()


async def _scheduled(base_url: str, target: Target, images: ImageSet, dues: np.ndarray, offset: int,
                     timeout_s: float, max_connections: int, poll_path: str | None = None,
                     poll_interval_s: float = 0.5) -> tuple[list[Timed], list[Poll], float]:
    """Send request ``i`` (image ``offset + i``) at ``t0 + dues[i]``; optionally ``GET poll_path`` every
    ``poll_interval_s`` on its own connection until every request is answered or timed out."""
    idle: list[RawClient] = []
    busy = 0
    out: list[Timed] = []
    t0 = time.perf_counter() + 0.05

    async def fire(i: int, due: float) -> None:
        nonlocal busy
        if busy >= max_connections:  # the generator's own cap: counted, never silently skipped
            now = time.perf_counter()
            out.append(Timed(due - t0, now - due, _Record(offset + i, due, now, None, failure="client_cap")))
            return
        client = idle.pop() if idle else RawClient(base_url, timeout_s)
        busy += 1
        late = time.perf_counter() - due
        try:
            rec = await _one(client, target, images, offset + i)
        finally:
            busy -= 1
        rec.start = due  # latency counts from when the request was due, not from when it got sent
        out.append(Timed(due - t0, late, rec))
        if rec.failure:
            await client.close()
        else:
            idle.append(client)

    polls: list[Poll] = []
    stop = asyncio.Event()
    poller = (asyncio.create_task(_poller(base_url, poll_path, poll_interval_s, t0, polls, stop, timeout_s))
              if poll_path else None)
    tasks = []
    for i, rel in enumerate(dues.tolist()):
        due = t0 + rel
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    stop.set()
    if poller is not None:
        await poller
    await asyncio.gather(*(c.close() for c in idle))
    return out, polls, wall


def run_schedule(base_url: str, target: Target, images: ImageSet, dues: np.ndarray, *, offset: int = 0,
                 timeout_s: float = 30.0, max_connections: int = 512, poll_path: str | None = None,
                 poll_interval_s: float = 0.5) -> tuple[list[Timed], list[Poll], float]:
    """Run one open-loop schedule (seconds after the start, ascending); returns every request (``Timed``,
    in completion order), the polls of ``poll_path`` and the wall time. Bounded: the last arrival plus
    ``timeout_s``. Loopback only."""
    check_loopback(base_url)
    if len(dues) == 0 or np.any(np.diff(dues) < 0) or dues[0] < 0:
        raise ValueError("dues must be non-empty, ascending and not negative")
    return _run(_scheduled(base_url, target, images, dues, offset, timeout_s, max_connections, poll_path,
                           poll_interval_s))


def run_open_loop(base_url: str, target: Target, images: ImageSet, *, rate: float, duration_s: float,
                  settle_s: float = 0.0, offset: int = 0, timeout_s: float = 30.0,
                  max_connections: int = 512, arrivals: str = "uniform", seed: int = 0) -> dict[str, Any]:
    """Send about ``rate * (settle_s + duration_s)`` requests at ``rate`` per second (``arrivals``: uniform
    spacing or a seeded Poisson process); the report (the 2g shape of
    :func:`bench.loadgen.run_load`) covers the requests due after ``settle_s``; ``settle`` summarises the
    ones before; ``generator`` says how late requests left; ``timeline`` has per second: answers, p99,
    mean FLOPs fraction, the most common profile."""
    check_loopback(base_url)
    if rate <= 0 or duration_s <= 0 or settle_s < 0:
        raise ValueError("rate and duration_s must be positive, settle_s not negative")
    everything, wall = _run(_open_loop(base_url, target, images, rate, settle_s + duration_s, offset, timeout_s,
                                       max_connections, arrivals, seed))
    timed = [t for t in everything if t.due >= settle_s]
    early = [t.record for t in everything if t.due < settle_s]
    records = [t.record for t in timed]
    ok = [r for r in records if r.answer is not None]
    answers = [(r.i, r.answer) for r in ok if r.answer is not None]
    late = np.array([t.late_s for t in timed])
    return {
        "target": target.name,
        "load": {"kind": "open loop", "arrivals": arrivals, "seed": seed, "rate_rps": rate,
                 "duration_s": duration_s, "settle_s": settle_s,
                 "requests": len(records),
                 "timeout_s": timeout_s, "max_connections": max_connections,
                 "latency_from": "the scheduled send time"},
        "counts": _counts(records),
        "non_2xx": len(records) - len(ok),
        "window_seconds": wall,
        "ok_rps": len(ok) / duration_s,
        "latency_seconds": latency_summary([r.end - r.start for r in ok]),
        "server": _server_side([a for _, a in answers]),
        "early_exit": _early_exit(answers, images),
        "swap": _states([a for _, a in answers]),
        "generator": {"late_p50_s": float(np.percentile(late, 50)), "late_p99_s": float(np.percentile(late, 99)),
                      "client_cap_hits": sum(1 for r in records if r.failure == "client_cap")},
        "settle": {"requests": len(early), "ok": sum(1 for r in early if r.answer is not None),
                   "latency_seconds": latency_summary([r.end - r.start for r in early if r.answer is not None])},
        "timeline": timeline(everything),
    }


def timeline(timed: list[Timed]) -> list[dict[str, Any]]:
    """Per second of the run (by due time): answers, their p99, mean FLOPs fraction and top profile."""
    buckets: dict[int, list[Timed]] = {}
    for t in timed:
        buckets.setdefault(int(t.due), []).append(t)
    out = []
    for sec in sorted(buckets):
        okd = [t.record for t in buckets[sec] if t.record.answer is not None]
        lat = [r.end - r.start for r in okd]
        fr = [r.answer.flops_fraction for r in okd if r.answer and r.answer.flops_fraction is not None]
        profiles = [r.answer.profile for r in okd if r.answer and r.answer.profile]
        out.append({"second": sec, "sent": len(buckets[sec]), "ok": len(okd),
                    "p99_s": float(np.percentile(lat, 99)) if lat else None,
                    "mean_flops_fraction": float(np.mean(fr)) if fr else None,
                    "profile": max(set(profiles), key=profiles.count) if profiles else None})
    return out
