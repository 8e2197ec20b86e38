"""The pure parts of bench.autopilot: Poisson schedules, per-step figures, trace windows, /profiles polls read
defensively, recovery time, the issue's goals from a synthetic result, the report; plus the open-loop
generator against a stub HTTP server on 127.0.0.1 (bounded: a few hundred requests, a 5 s client timeout)."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.autopilot_eval import (
    evaluate_goals,
    load_key,
    mean_cost,
    poll_point,
    recovery_seconds,
    summarize,
    windows,
)
from bench.images import ImageSet
from bench.loadgen import Answer, ClassmeansTarget, _Record, _run, collector_paused
from bench.openloop import Timed, arrival_times, run_schedule, segment_schedule

# -- schedules ---------------------------------------------------------------------------------------------


def test_poisson_schedule_is_deterministic_per_seed_and_within_the_window() -> None:
    a = arrival_times(200.0, 5.0, "poisson", seed=3)
    b = arrival_times(200.0, 5.0, "poisson", seed=3)
    c = arrival_times(200.0, 5.0, "poisson", seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a[:50], c[:50])
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 5.0


def test_poisson_schedule_has_the_asked_rate_and_exponential_gaps() -> None:
    t = arrival_times(500.0, 40.0, "poisson", seed=11)  # 20,000 expected
    assert len(t) == pytest.approx(20_000, rel=0.03)  # sd of the count: ~0.7 %
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 500, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: coefficient of variation 1


def test_uniform_schedule_is_evenly_spaced_and_offset() -> None:
    t = arrival_times(10.0, 2.0, "uniform", start_s=1.0)
    assert np.allclose(t, 1.0 + np.arange(20) / 10.0)
    with pytest.raises(ValueError):
        arrival_times(10.0, 2.0, "bursty")
    with pytest.raises(ValueError):
        arrival_times(0.0, 2.0)


def test_segment_schedule_steps_the_rate() -> None:
    t = segment_schedule([(100.0, 10.0), (300.0, 10.0), (100.0, 10.0)], "poisson", seed=1)
    counts = [int(((t >= k * 10) & (t < (k + 1) * 10)).sum()) for k in range(3)]
    assert counts[0] == pytest.approx(1000, rel=0.1) and counts[1] == pytest.approx(3000, rel=0.06)
    assert counts[2] == pytest.approx(1000, rel=0.1) and np.all(np.diff(t) > 0)
    assert np.array_equal(t, segment_schedule([(100.0, 10.0), (300.0, 10.0), (100.0, 10.0)], "poisson", seed=1))


# -- per-step figures and windows --------------------------------------------------------------------------

LABELS = np.array([0, 1, 2, 3])


def ok(i: int, due: float, lat: float, cls: int, profile: str = "full", frac: float = 1.0,
       time_fraction: float | None = None) -> Timed:
    ans = Answer(class_index=cls, exit_index=3, flops_fraction=frac, profile=profile, sample_profile=profile,
                 time_fraction=time_fraction)
    return Timed(due, 0.0, _Record(i, 100.0 + due, 100.0 + due + lat, 200, answer=ans))


def shed(i: int, due: float, lat: float, retry_after: bool = True) -> Timed:
    return Timed(due, 0.0, _Record(i, 100.0 + due, 100.0 + due + lat, 503, code="overloaded",
                                   retry_after=retry_after))


def failed(i: int, due: float, kind: str = "timeout") -> Timed:
    return Timed(due, 0.0, _Record(i, 100.0 + due, 100.0 + due + 5.0, None, failure=kind))


COSTS = {"full": {"time_fraction": 1.0, "accuracy": 0.92}, "hull-3": {"time_fraction": 0.4, "accuracy": 0.8},
         "untimed": {"time_fraction": None, "accuracy": 0.7}}


def test_summarize_counts_outcomes_latencies_accuracy_and_costs() -> None:
    timed = [ok(0, 0.1, 0.010, 0), ok(1, 0.2, 0.020, 1, "hull-3", 0.3), ok(2, 0.3, 0.030, 0, "hull-3", 0.3),
             shed(3, 0.4, 0.002), shed(4, 0.5, 0.004, retry_after=False), failed(5, 0.6)]
    s = summarize(timed, LABELS, 2.0, COSTS)
    assert s["requests"] == 6 and s["offered_rps"] == 3.0 and s["answered"] == 3 and s["answered_rps"] == 1.5
    assert s["shed"] == 2 and s["shed_with_retry_after"] == 1 and s["shed_codes"] == {"overloaded": 2}
    assert s["other_non_2xx"] == 1 and s["other_by_failure"] == {"timeout": 1} and s["non_2xx"] == 3
    assert s["p50_ms"] == pytest.approx(20.0) and s["shed_p99_ms"] == pytest.approx(3.98)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["correct"] == 2
    assert s["mean_flops_fraction"] == pytest.approx((1.0 + 0.6) / 3)
    assert s["mean_time_fraction"] == pytest.approx(1.8 / 3) and s["time_fraction_source"] == {"profile table": 3}
    assert s["estimated_accuracy"] == pytest.approx((0.92 + 1.6) / 3)
    assert mean_cost(s) == s["mean_time_fraction"]


def test_time_fraction_from_the_answer_wins_and_partial_coverage_is_not_a_mean() -> None:
    s = summarize([ok(0, 0.1, 0.01, 0, "hull-3", 0.3, time_fraction=0.5)], LABELS, 1.0, COSTS)
    assert s["mean_time_fraction"] == 0.5 and s["time_fraction_source"] == {"response": 1}
    s = summarize([ok(0, 0.1, 0.01, 0, "hull-3", 0.3), ok(1, 0.2, 0.01, 1, "untimed", 0.2)], LABELS, 1.0, COSTS)
    assert s["mean_time_fraction"] is None and s["time_fraction_coverage"] == 0.5
    assert mean_cost(s) == pytest.approx(0.25)  # falls back to FLOPs
    lit = Timed(0.1, 0.0, _Record(0, 100.1, 100.2, 200, answer=Answer(class_index=0, flops_fraction=1.0)))
    s = summarize([lit], LABELS, 1.0, COSTS)  # LitServe: the full network, no profile named
    assert s["mean_time_fraction"] == 1.0 and s["time_fraction_source"] == {"full network": 1}


def test_windows_bucket_by_scheduled_time_and_keep_empty_ones() -> None:
    timed = [ok(0, 0.1, 0.010, 0), ok(1, 0.9, 0.050, 1), shed(2, 1.2, 0.002), failed(3, 1.5), ok(4, 3.9, 0.01, 2)]
    w = windows(timed, 1.0, 4.0)
    assert [r["t"] for r in w] == [0.0, 1.0, 2.0, 3.0]
    assert w[0]["offered_rps"] == 2 and w[0]["answered_rps"] == 2 and w[0]["shed_rps"] == 0
    assert w[0]["p99_ms"] == pytest.approx(49.6)
    assert w[1]["shed_fraction"] == 0.5 and w[1]["other_non_2xx"] == 1 and w[1]["p99_ms"] is None
    assert w[2]["offered_rps"] == 0 and w[2]["shed_fraction"] is None
    assert w[3]["answered_rps"] == 1
    w2 = windows(timed, 2.0, 4.0)
    assert len(w2) == 2 and w2[0]["offered_rps"] == 2.0  # 4 arrivals in 2 s
    with pytest.raises(ValueError):
        windows(timed, 0.0, 4.0)


# -- polls and recovery -----------------------------------------------------------------------------------

def test_poll_point_reads_the_new_and_the_old_autopilot_keys_and_tolerates_missing_ones() -> None:
    new = {"autopilot": {"enabled": True, "latency_slo_ms": 50, "p99_ms": 31.5, "shed_rate": 0.2, "reason": "shed",
                         "operating": {"name": "hull-3", "accuracy": 0.8, "flops_fraction": 0.3}}}
    p = poll_point(new)
    assert (p["target_ms"], p["shed_rate"], p["reason"], p["operating"], p["estimated_accuracy"]) == (
        50.0, 0.2, "shed", "hull-3", 0.8)
    old = {"active": {"name": "full", "accuracy": 0.92}, "autopilot": {"enabled": False, "target_ms": 40, "why": "x"}}
    p = poll_point(old)
    assert p["target_ms"] == 40.0 and p["reason"] == "x" and p["estimated_accuracy"] == 0.92
    assert p["shed_rate"] is None and p["p99_ms"] is None
    assert poll_point(None) == {"ok": False} and poll_point({})["estimated_accuracy"] is None


def test_recovery_is_the_time_to_reach_full_accuracy_and_hold_it() -> None:
    pts = [{"t": t, "estimated_accuracy": a} for t, a in
           [(19.5, 0.5), (20.5, 0.5), (23.0, 0.921), (24.0, 0.80), (26.0, 0.9215), (30.0, 0.92), (40.0, 0.92)]]
    assert recovery_seconds(pts, 20.0, 60.0, 0.922) == pytest.approx(6.0)  # the dip at 24 s restarts the clock
    assert recovery_seconds(pts[:4], 20.0, 60.0, 0.922) is None  # ends below
    assert recovery_seconds([], 20.0, 60.0, 0.922) is None
    assert recovery_seconds(pts, 20.0, 25.0, 0.922) is None


# -- goals -------------------------------------------------------------------------------------------------

def row(**kw: Any) -> dict[str, Any]:
    base = {"requests": 1000, "offered_rps": 100.0, "answered_rps": 100.0, "p50_ms": 10.0, "p99_ms": 40.0,
            "shed": 0, "shed_with_retry_after": 0, "shed_p99_ms": None, "other_non_2xx": 0, "non_2xx": 0,
            "accuracy": 0.92, "mean_flops_fraction": 1.0, "mean_time_fraction": 1.0}
    base.update(kw)
    return base


def synthetic() -> dict[str, Any]:
    return {
        "target_ms": 50.0, "floor_capacity_rps": 300.0,
        "rows": {
            "full": {"0.5": row(), "1": row(p99_ms=150.0), "2": row(p99_ms=900.0), "3": row(p99_ms=1000.0)},
            "autopilot": {"0.5": row(mean_time_fraction=0.97, accuracy=0.919), "1": row(accuracy=0.912),
                          "2": row(p99_ms=45.0, accuracy=0.6), "3": row(p99_ms=70.0, accuracy=0.5)},
            "autopilot_floor": {
                "0.5": row(mean_time_fraction=0.9, accuracy=0.9),
                "1": row(p99_ms=49.0, accuracy=0.915, shed=3, non_2xx=3, shed_with_retry_after=3),
                "2": row(offered_rps=400.0, answered_rps=280.0, shed=1200, shed_with_retry_after=1200,
                         shed_p99_ms=4.0, non_2xx=1200, accuracy=0.88),
                "3": row(offered_rps=600.0, answered_rps=250.0, shed=3500, shed_with_retry_after=3499,
                         shed_p99_ms=4.0, non_2xx=3500, accuracy=0.88, p99_ms=55.0)},
            "litserve": {"2": row(p99_ms=3000.0, non_2xx=50), "3": row(p99_ms=4000.0)},
        },
        "trace": {"autopilot_floor": {"recovery_s": 4.0, "polled": True},
                  "autopilot": {"recovery_s": None, "polled": True}},
    }


def verdicts(goals: list[dict[str, Any]]) -> dict[tuple[str, str, str | None], bool | None]:
    return {(g["config"], g["goal"], g["load"]): g["met"] for g in goals}


def test_goals_are_evaluated_from_a_synthetic_result() -> None:
    v = verdicts(evaluate_goals(synthetic(), fast_503_ms=20.0))
    ap, fl = "autopilot", "autopilot_floor"
    assert v[(ap, "0.5x: mean cost >= 0.95 of the full network's", "0.5")] is True
    assert v[(ap, "0.5x: accuracy within 0.2 points of full", "0.5")] is True  # -0.1 pt
    assert v[(fl, "0.5x: mean cost >= 0.95 of the full network's", "0.5")] is False
    assert v[(fl, "0.5x: accuracy within 0.2 points of full", "0.5")] is False
    assert v[(ap, "1x: p99 of answered <= target", "1")] is True
    assert v[(ap, "1x: accuracy >= full - 1 point", "1")] is True  # 91.2 >= 91
    assert v[(ap, "1x: no shedding", "1")] is True and v[(fl, "1x: no shedding", "1")] is False
    assert v[(ap, "2x: p99 of answered <= target", "2")] is True
    assert v[(ap, "3x: p99 of answered <= target", "3")] is False
    assert v[(ap, "2x, no floor: 0 non-2xx", "2")] is True
    assert v[(fl, "2x, floor: accuracy >= full - 5 points", "2")] is True
    assert v[(fl, "2x, floor: answered >= 0.9x the floor point's capacity", "2")] is True  # 280 >= 270
    assert v[(fl, "3x, floor: answered >= 0.9x the floor point's capacity", "3")] is False  # 250 < 270
    assert v[(fl, "2x, floor: every other request a fast 503 with Retry-After", "2")] is True
    assert v[(fl, "3x, floor: every other request a fast 503 with Retry-After", "3")] is False  # one lacks it
    assert v[(fl, "after the step back to 0.5x: full accuracy within 10 s", "trace")] is True
    assert v[(ap, "after the step back to 0.5x: full accuracy within 10 s", "trace")] is False
    lit = [g for g in evaluate_goals(synthetic()) if g["config"] == "litserve"]
    assert [g["met"] for g in lit] == [None, None] and "3000 ms" in lit[0]["figures"]


def test_goals_need_the_floor_capacity_and_say_when_not_measured() -> None:
    res = synthetic()
    res["floor_capacity_rps"] = None
    del res["rows"]["autopilot"]["1"]
    res["rows"]["autopilot_floor"]["2"]["shed_p99_ms"] = 35.0  # slow 503s
    v = verdicts(evaluate_goals(res, fast_503_ms=20.0))
    assert v[("autopilot_floor", "2x, floor: answered >= 0.9x the floor point's capacity", "2")] is None
    assert v[("autopilot", "1x: p99 <= target, accuracy >= full - 1 pt, no shedding", "1")] is None
    assert v[("autopilot_floor", "2x, floor: every other request a fast 503 with Retry-After", "2")] is False
    assert load_key(0.5) == "0.5" and load_key(2.0) == "2"


def test_report_renders_from_a_synthetic_result(tmp_path: Path) -> None:
    from bench.autopilot_report import render

    res = synthetic()
    res.update({"model_dir": "model_store/x", "environment": {"loadavg_start": "1 1 1", "loadavg_end": "2 2 2"},
                "plan": {"rounds": 2, "settle_s": 5.0, "step_s": 30.0, "poll_s": 0.5}, "full_capacity_rps": 100.0,
                "pinning": {"enabled": True, "server": "taskset -c 0", "generator": "sched_setaffinity {1}"},
                "target": {"basis": "synthetic"}, "steps": []})
    res["goals"] = evaluate_goals(res)
    w = [{"t": float(t), "offered_rps": 10.0, "answered_rps": 9.0, "shed_rps": 1.0, "shed_fraction": 0.1,
          "other_non_2xx": 0, "p99_ms": 20.0, "mean_flops_fraction": 0.5} for t in range(6)]
    polls = [{"t": 0.5 * k, "estimated_accuracy": 0.9, "p99_ms": 10.0, "shed_rate": 0.1} for k in range(12)]
    phase = row()
    res["trace"] = {"autopilot_floor": {"recovery_s": 1.0, "polled": True, "windows": w, "window_s": 1.0,
                                        "polls": polls, "phases": [phase] * 3,
                                        "segments": [{"rate_rps": 5, "seconds": 2.0}] * 3}}
    render(res, tmp_path)
    md = (tmp_path / "autopilot.md").read_text()
    assert "**50 ms**" in md and "taskset -c 0" in md and "| 2x |" in md and "**not met**" in md
    assert (tmp_path / "img" / "autopilot.png").stat().st_size > 0
    assert (tmp_path / "img" / "autopilot_trace.png").stat().st_size > 0
    json.dumps(res)


# -- the generator against a stub server ------------------------------------------------------------------

@pytest.fixture()
def stub_url() -> Iterator[str]:
    """A keep-alive HTTP/1.1 stub on 127.0.0.1: POST /classify answers 200 (a classify-shaped body) or, every
    third request, 503 with Retry-After; GET /profiles answers a small autopilot status."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    port: list[int] = []
    count = [0]
    body = json.dumps({"model": "m", "bundle": "b", "profile": "full", "version": 1, "operating": None,
                       "predictions": [{"class_index": 1, "exit_index": 3, "flops_fraction": 1.0,
                                        "profile": "full"}],
                       "queue_seconds": 0.0, "inference_seconds": 0.001, "batch_samples": 1}).encode()
    status_body = json.dumps({"autopilot": {"enabled": True, "latency_slo_ms": 50, "shed_rate": 0.33}}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                n = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")), 0)
                await reader.readexactly(n)
                if lines[0].startswith("GET"):
                    out, code, extra = status_body, "200 OK", ""
                else:
                    count[0] += 1
                    if count[0] % 3 == 0:
                        out, code, extra = b'{"error": {"code": "overloaded", "message": "x"}}', \
                            "503 Service Unavailable", "Retry-After: 1\r\n"
                    else:
                        out, code, extra = body, "200 OK", ("x-classmeans-bundle: b\r\nx-classmeans-profile: full"
                                                            "\r\nx-classmeans-version: 1\r\n")
                writer.write(f"HTTP/1.1 {code}\r\nContent-Type: application/json\r\n{extra}"
                             f"Content-Length: {len(out)}\r\n\r\n".encode() + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        port.append(server.sockets[0].getsockname()[1])
        started.set()
        loop.run_forever()
        server.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port[0]}"
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)


def test_open_loop_schedule_against_a_stub_counts_every_outcome_and_polls(stub_url: str) -> None:
    images = ImageSet(np.zeros((4, 2, 2, 3), np.uint8), np.array([1, 1, 0, 1]), [b"png"] * 4, [], "stub")
    dues = arrival_times(300.0, 0.5, "poisson", seed=5)
    timed, polls, wall = run_schedule(stub_url, ClassmeansTarget(), images, dues, timeout_s=5.0,
                                      poll_path="/profiles", poll_interval_s=0.1)
    assert len(timed) == len(dues) and wall < 5.0
    s = summarize(timed, images.labels, 0.5)
    assert s["shed"] == len(dues) // 3 and s["shed_with_retry_after"] == s["shed"]
    assert s["answered"] + s["shed"] == len(dues) and s["other_non_2xx"] == 0
    assert s["accuracy"] == pytest.approx(0.75, abs=0.1)  # label 0 for every fourth image
    assert sorted(t.due for t in timed) == pytest.approx(sorted(dues.tolist()))
    assert polls and poll_point(polls[0].body)["shed_rate"] == 0.33
    with pytest.raises(ValueError):
        run_schedule("http://example.com", ClassmeansTarget(), images, dues)


def test_the_generators_run_with_the_collector_paused_and_restore_it() -> None:
    """A collection in the generator would read as the server's latency: none runs while a load runs
    (``_run``, what the open and closed loops both run on), and the collector's state is restored after,
    also when the load fails or the collector was already off."""
    async def collector_on() -> bool:
        return gc.isenabled()

    async def failing() -> None:
        raise RuntimeError("load failed")

    assert gc.isenabled()
    assert _run(collector_on()) is False
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        _run(failing())
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off: it stays off
    finally:
        gc.enable()
