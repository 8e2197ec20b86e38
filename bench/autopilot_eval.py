"""The pure half of :mod:`bench.autopilot`: per-step figures from the open-loop records, the trace's windows,
the ``GET /profiles`` poll series, the recovery time, and the issue's goals evaluated on a result dict.

No servers, no clocks: everything here takes records (or plain dicts) and returns JSON-able dicts, so the
tests feed it synthetic data (``tests/bench/test_autopilot_bench.py``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from bench.openloop import Poll, Timed

AUTOPILOTS = ("autopilot", "autopilot_floor")
OTHER_FAILURES = ("timeout", "reset", "connect_error", "client_cap")


def load_key(mult: float) -> str:
    """``0.5 -> "0.5"``, ``2.0 -> "2"``: the key of a load in the result dict."""
    return f"{mult:g}"


def _pct_ms(values: list[float], q: float) -> float | None:
    return 1000.0 * float(np.percentile(values, q)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(timed: list[Timed], labels: np.ndarray, seconds: float,
              costs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Figures of one step (or of several rounds pooled): ``seconds`` is the measured arrival time they span.

    answered: 2xx; shed: HTTP 503 (their latency and whether each carried Retry-After); other non-2xx: any
    other status, and requests without an HTTP answer (client timeout, reset, refused connection, or the
    generator's own connection cap). Latency counts from the scheduled send time. Accuracy is against the
    labels. Cost: the answer's ``flops_fraction``; its ``time_fraction`` when the answer carries one, else the
    ``time_fraction`` of the profile it names in ``costs`` (``GET /profiles``: expected time at batch 1
    over the full network's); ``mean_time_fraction`` is ``None`` unless every answer has one (the mean over
    those that have is kept apart, with the coverage); ``estimated_accuracy``: the mean over answers of the
    served profile's estimate (``None`` unless every answer's profile has one)."""
    costs = costs or {}
    recs = [t.record for t in timed]
    ok = [r for r in recs if r.answer is not None]
    shed = [r for r in recs if r.status == 503]
    other_status = Counter(str(r.status) for r in recs
                           if r.status is not None and r.answer is None and r.status != 503)
    failures = Counter(r.failure.split(":")[0] for r in recs if r.status is None and r.failure)
    lat = [r.end - r.start for r in ok]
    shed_lat = [r.end - r.start for r in shed]
    n = len(labels)
    correct = sum(1 for r in ok if r.answer is not None and r.answer.class_index == int(labels[r.i % n]))
    flops = [r.answer.flops_fraction for r in ok if r.answer is not None and r.answer.flops_fraction is not None]
    times: list[float] = []
    est: list[float] = []
    sources: Counter[str] = Counter()
    profiles: Counter[str] = Counter()
    for r in ok:
        a = r.answer
        assert a is not None
        name = a.sample_profile or a.profile
        if name:
            profiles[name] += 1
        row = costs.get(name or "", {})
        if a.time_fraction is not None:
            times.append(a.time_fraction)
            sources["response"] += 1
        elif row.get("time_fraction") is not None:
            times.append(float(row["time_fraction"]))
            sources["profile table"] += 1
        elif name is None and a.flops_fraction == 1.0:  # a full-network server naming no profile (LitServe)
            times.append(1.0)
            sources["full network"] += 1
        if row.get("accuracy") is not None:
            est.append(float(row["accuracy"]))
    other = sum(other_status.values()) + sum(failures.values())
    coverage = len(times) / len(ok) if ok else None
    seconds = max(seconds, 1e-9)
    return {
        "requests": len(recs), "offered_rps": len(recs) / seconds, "answered": len(ok),
        "answered_rps": len(ok) / seconds,
        "p50_ms": _pct_ms(lat, 50), "p99_ms": _pct_ms(lat, 99), "max_ms": 1000 * max(lat) if lat else None,
        "shed": len(shed), "shed_fraction": len(shed) / len(recs) if recs else None,
        "shed_with_retry_after": sum(1 for r in shed if r.retry_after),
        "shed_codes": dict(Counter(r.code for r in shed)),
        "shed_p50_ms": _pct_ms(shed_lat, 50), "shed_p99_ms": _pct_ms(shed_lat, 99),
        "other_non_2xx": other, "other_by_status": dict(other_status), "other_by_failure": dict(failures),
        "non_2xx": len(recs) - len(ok),
        "accuracy": correct / len(ok) if ok else None, "correct": correct,
        "mean_flops_fraction": _mean(flops),
        "mean_time_fraction": _mean(times) if coverage == 1.0 else None,
        "time_fraction_coverage": coverage, "mean_time_fraction_of_covered": _mean(times),
        "time_fraction_source": dict(sources),
        "estimated_accuracy": _mean(est) if est and len(est) == len(ok) else None,
        "profiles": dict(profiles.most_common(5)),
        "generator_late_p99_ms": _pct_ms([t.late_s for t in timed], 99),
    }


def mean_cost(row: dict[str, Any]) -> float | None:
    """The cost the goals use: mean time fraction when measured, else mean FLOPs fraction."""
    v = row.get("mean_time_fraction")
    return row.get("mean_flops_fraction") if v is None else v


# -- the trace ---------------------------------------------------------------------------------------------

def windows(timed: list[Timed], window_s: float, end_s: float) -> list[dict[str, Any]]:
    """Per window of ``window_s`` seconds of scheduled send time, ``[k w, (k + 1) w)`` up to ``end_s``:
    offered, answered and shed rates (requests due in the window, by outcome), p99 of the answered, the
    answers' accuracy and mean FLOPs fraction. Empty windows are kept (zeros, ``None`` percentiles)."""
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    count = max(1, math.ceil(end_s / window_s - 1e-9))
    buckets: list[list[Timed]] = [[] for _ in range(count)]
    for t in timed:
        k = int(t.due // window_s)
        if 0 <= k < count:
            buckets[k].append(t)
    out = []
    for k, b in enumerate(buckets):
        ok = [t.record for t in b if t.record.answer is not None]
        lat = [r.end - r.start for r in ok]
        fr = [r.answer.flops_fraction for r in ok if r.answer is not None and r.answer.flops_fraction is not None]
        shed = sum(1 for t in b if t.record.status == 503)
        out.append({"t": k * window_s, "offered_rps": len(b) / window_s, "answered_rps": len(ok) / window_s,
                    "shed_rps": shed / window_s, "shed_fraction": shed / len(b) if b else None,
                    "other_non_2xx": len(b) - len(ok) - shed, "p99_ms": _pct_ms(lat, 99),
                    "mean_flops_fraction": _mean(fr)})
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def poll_point(body: Any) -> dict[str, Any]:
    """The figures of one ``GET /profiles`` answer, read defensively (a missing key is ``None``): the
    autopilot's state (``enabled``, ``latency_slo_ms`` or the older ``target_ms``, ``p99_ms``, ``shed_rate``,
    ``reason`` or the older ``why``) and the estimated accuracy of the point it holds (``autopilot.operating``,
    else the active point)."""
    if not isinstance(body, dict):
        return {"ok": False}
    auto = body.get("autopilot") if isinstance(body.get("autopilot"), dict) else {}
    op = auto.get("operating") if isinstance(auto.get("operating"), dict) else None
    if op is None:
        op = body.get("active") if isinstance(body.get("active"), dict) else {}
    target = auto.get("latency_slo_ms", auto.get("target_ms"))
    reason = auto.get("reason", auto.get("why"))
    return {"ok": True, "enabled": auto.get("enabled"), "target_ms": _num(target), "p99_ms": _num(auto.get("p99_ms")),
            "shed_rate": _num(auto.get("shed_rate")), "operating": op.get("name"),
            "estimated_accuracy": _num(op.get("accuracy")), "flops_fraction": _num(op.get("flops_fraction")),
            "reason": None if reason is None else str(reason)[:160],
            "shed_by_queue": auto.get("shed_by_queue"), "shed_by_rate": auto.get("shed_by_rate"),
            "admit_rate_sps": _num(auto.get("admit_rate_sps")), "cpu_util": _num(auto.get("cpu_util")),
            "relief_moves": auto.get("relief_moves"), "relieved_admitted": auto.get("relieved_admitted"),
            "tail_admitted": auto.get("tail_admitted"),
            "bucket_scale": _num(auto.get("bucket_scale")), "util_cap": _num(auto.get("util_cap"))}


def poll_series(polls: list[Poll]) -> list[dict[str, Any]]:
    return [{"t": round(p.t, 3), **poll_point(p.body)} for p in polls]


def recovery_seconds(series: list[dict[str, Any]], t_from: float, t_to: float, full_accuracy: float,
                     tolerance: float = 0.002) -> float | None:
    """Seconds after ``t_from`` until the polled estimated accuracy reached ``full_accuracy - tolerance`` and
    held it at every later poll up to ``t_to`` (``None``: it never did, or no poll said)."""
    pts = [p for p in series if t_from <= p["t"] < t_to and p.get("estimated_accuracy") is not None]
    if not pts:
        return None
    good = [p["estimated_accuracy"] >= full_accuracy - tolerance for p in pts]
    if not good[-1]:
        return None
    k = len(good)
    while k > 0 and good[k - 1]:
        k -= 1
    return max(0.0, pts[k]["t"] - t_from)


# -- goals -------------------------------------------------------------------------------------------------

def _g(goal: str, config: str, load: str | None, met: bool | None, figures: str) -> dict[str, Any]:
    return {"goal": goal, "config": config, "load": load, "met": met, "figures": figures}


def _f(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if v is None else f"{format(v, spec)}{unit}"


def evaluate_goals(res: dict[str, Any], fast_503_ms: float = 20.0, recovery_limit_s: float = 10.0
                   ) -> list[dict[str, Any]]:
    """The goals of issue #25, each met / not met (``None``: not measured) with the figures it rests on.

    ``res`` needs ``target_ms``, ``rows[config][load_key]`` (:func:`summarize` dicts; ``full`` at ``0.5`` is
    the reference for accuracy and cost), ``floor_capacity_rps`` and optionally ``trace[config]`` with
    ``recovery_s``."""
    target = float(res["target_ms"])
    rows: dict[str, dict[str, dict[str, Any]]] = res.get("rows", {})
    ref = rows.get("full", {}).get("0.5")
    full_acc = None if ref is None else ref.get("accuracy")
    full_cost = None if ref is None else mean_cost(ref)
    out: list[dict[str, Any]] = []

    def row(cfg: str, load: str) -> dict[str, Any] | None:
        return rows.get(cfg, {}).get(load)

    for cfg in AUTOPILOTS:
        if cfg not in rows:
            continue
        r = row(cfg, "0.5")
        if r is None or ref is None:
            out.append(_g("0.5x: full accuracy", cfg, "0.5", None, "not measured"))
        else:
            c = mean_cost(r)
            ratio = None if c is None or not full_cost else c / full_cost
            out.append(_g("0.5x: mean cost >= 0.95 of the full network's", cfg, "0.5",
                          None if ratio is None else ratio >= 0.95,
                          f"cost {_f(c, '.3f')} vs full {_f(full_cost, '.3f')} (ratio {_f(ratio, '.3f')})"))
            top = res.get("most_accurate_point") or {}
            top_cost = top.get("time_fraction") if r.get("mean_time_fraction") is not None else top.get(
                "flops_fraction")
            if top.get("name") not in (None, "full") and top_cost:
                # the autopilot's ceiling is the most accurate point; here it is cheaper than the full network
                out.append(_g("0.5x: mean cost >= 0.95 of the most accurate point's (the autopilot's ceiling)", cfg,
                              "0.5", None if c is None else c / top_cost >= 0.95,
                              f"cost {_f(c, '.3f')} vs {top['name']} {top_cost:.3f} (estimated accuracy "
                              f"{100 * (top.get('accuracy') or 0):.2f} %, the full network's "
                              f"{100 * (res.get('model', {}).get('full_estimated_accuracy') or 0):.2f} %)"))
            acc, d = r.get("accuracy"), None
            if acc is not None and full_acc is not None:
                d = 100 * (acc - full_acc)
            out.append(_g("0.5x: accuracy within 0.2 points of full", cfg, "0.5",
                          None if d is None else d >= -0.2,
                          f"{_f(None if acc is None else 100 * acc, '.2f', ' %')} vs full "
                          f"{_f(None if full_acc is None else 100 * full_acc, '.2f', ' %')} ({_f(d, '+.2f')} pt)"))
        r = row(cfg, "1")
        if r is None:
            out.append(_g("1x: p99 <= target, accuracy >= full - 1 pt, no shedding", cfg, "1", None, "not measured"))
        else:
            p99 = r.get("p99_ms")
            out.append(_g("1x: p99 of answered <= target", cfg, "1", None if p99 is None else p99 <= target,
                          f"p99 {_f(p99, '.1f', ' ms')} vs target {target:.0f} ms"))
            acc = r.get("accuracy")
            out.append(_g("1x: accuracy >= full - 1 point", cfg, "1",
                          None if acc is None or full_acc is None else acc >= full_acc - 0.01,
                          f"{_f(None if acc is None else 100 * acc, '.2f', ' %')} vs full "
                          f"{_f(None if full_acc is None else 100 * full_acc, '.2f', ' %')}"))
            out.append(_g("1x: no shedding", cfg, "1", r.get("shed", 0) == 0,
                          f"{r.get('shed', 0)} shed (503), {r.get('other_non_2xx', 0)} other non-2xx "
                          f"of {r.get('requests', 0)}"))
        for load in ("2", "3"):
            r = row(cfg, load)
            if r is None:
                out.append(_g(f"{load}x: p99 of answered <= target", cfg, load, None, "not measured"))
                continue
            p99 = r.get("p99_ms")
            out.append(_g(f"{load}x: p99 of answered <= target", cfg, load, None if p99 is None else p99 <= target,
                          f"p99 {_f(p99, '.1f', ' ms')} vs target {target:.0f} ms"))
            if cfg == "autopilot_floor":
                acc = r.get("accuracy")
                out.append(_g(f"{load}x, floor: accuracy >= full - 5 points", cfg, load,
                              None if acc is None or full_acc is None else acc >= full_acc - 0.05,
                              f"{_f(None if acc is None else 100 * acc, '.2f', ' %')} vs full "
                              f"{_f(None if full_acc is None else 100 * full_acc, '.2f', ' %')}"))
                cap = res.get("floor_capacity_rps")
                if cap is None:
                    out.append(_g(f"{load}x, floor: answered >= 0.9x the floor point's capacity", cfg, load, None,
                                  "floor capacity not measured"))
                else:
                    need = 0.9 * min(float(cap), float(r.get("offered_rps") or 0.0))
                    out.append(_g(f"{load}x, floor: answered >= 0.9x the floor point's capacity", cfg, load,
                                  float(r.get("answered_rps") or 0.0) >= need,
                                  f"answered {_f(r.get('answered_rps'), '.0f')} req/s; floor capacity "
                                  f"{float(cap):.0f} req/s (closed loop), offered {_f(r.get('offered_rps'), '.0f')}:"
                                  f" needs >= {need:.0f} (0.9x the smaller)"))
                shed, with_ra = int(r.get("shed", 0)), int(r.get("shed_with_retry_after", 0))
                other, sp99 = int(r.get("other_non_2xx", 0)), r.get("shed_p99_ms")
                fast = shed == 0 or (sp99 is not None and sp99 <= fast_503_ms)
                out.append(_g(f"{load}x, floor: every other request a fast 503 with Retry-After", cfg, load,
                              other == 0 and with_ra == shed and fast,
                              f"{shed} shed ({with_ra} with Retry-After, p99 {_f(sp99, '.1f', ' ms')}, fast means "
                              f"<= {fast_503_ms:.0f} ms), {other} other non-2xx"))
            elif load == "2":
                out.append(_g("2x, no floor: 0 non-2xx", cfg, load, int(r.get("non_2xx", 0)) == 0,
                              f"{r.get('non_2xx', 0)} non-2xx of {r.get('requests', 0)} ({r.get('shed', 0)} shed)"))
    for cfg, tr in (res.get("trace") or {}).items():
        rec = tr.get("recovery_s")
        out.append(_g(f"after the step back to 0.5x: full accuracy within {recovery_limit_s:.0f} s", cfg, "trace",
                      None if rec is None and not tr.get("polled") else (rec is not None and rec <= recovery_limit_s),
                      f"{_f(rec, '.1f', ' s')} ({tr.get('recovery_basis', 'estimated accuracy from GET /profiles')})"))
    lit = rows.get("litserve", {})
    for load in ("2", "3"):
        r = lit.get(load)
        if r is None:
            continue
        ours = {c: (row(c, load) or {}).get("p99_ms") for c in ("autopilot", "autopilot_floor", "full")}
        out.append(_g(f"{load}x: LitServe's p99 beside ours", "litserve", load, None,
                      f"LitServe p99 {_f(r.get('p99_ms'), '.0f', ' ms')} ({r.get('non_2xx', 0)} non-2xx); ours: "
                      + ", ".join(f"{c} {_f(v, '.0f', ' ms')}" for c, v in ours.items())))
    return out
