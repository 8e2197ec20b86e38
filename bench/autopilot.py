"""The latency autopilot under open-loop Poisson load: autopilot, autopilot + floor, fixed at full, LitServe.

    python -m bench.autopilot [--model-dir model_store/cifar10-resnet56] [--step-s 30] [--rounds 2]
                              [--trace-step-s 60] [--quick]

One run on this machine, every server a child process on 127.0.0.1 (the model store copied to a temporary
directory first, so switches never touch the repository), real CIFAR-10 test PNGs, every answer checked
against its label. The server is pinned to one CPU (``taskset -c``) and this process, the load generator,
to another (``os.sched_setaffinity``), so their CPU does not mix; the JSON records the pinning (or why
there was none). Plan (issue #25):

1. ours at the full network (``POST /profiles {"name": "full"}``): its closed-loop capacity (32 clients);
   the same at the floor point (``{"min_accuracy": full - 5 points}``): the floor point's capacity;
2. the target: the full network's p99 under open load at 0.5x its capacity, times ``--margin`` (1.25),
   rounded up to 5 ms (``--target-ms`` sets it instead);
3. LitServe's best configuration: workers x threads probed closed loop at 32 clients, pinned like ours
   (as ``bench/serving_wrk.py`` probes it; ``--litserve-config`` skips the probe);
4. ``--rounds`` rounds; in each, for 0.5x, 1x, 2x, 3x the full network's capacity, every configuration
   back to back (order rotated each round) on the same Poisson arrival times and images: ours fixed at
   full, ours with the autopilot (``{"latency_slo_ms": T}``, engaged from the full network before every
   step), the same with the floor (``"min_accuracy"``), and LitServe (started for its step only). Each step
   is ``--settle-s`` at its rate (reported apart) then ``--step-s`` measured; rounds are pooled;
5. a step-load trace per ``--trace-configs``: 0.5x -> 3x -> 0.5x, ``--trace-step-s`` each, with
   ``GET /profiles`` polled every 0.5 s: offered and answered rate, p99 vs target and shed rate per
   ``--window-s`` window, the estimated accuracy of the point held, and the time back to full accuracy.

Writes ``docs/autopilot.json``, ``docs/autopilot.md``, ``docs/img/autopilot.png`` and
``docs/img/autopilot_trace.png``; the goals of the issue are evaluated in the JSON and the report
(:func:`bench.autopilot_eval.evaluate_goals`). Bounded: every step is its arrivals plus ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from bench.autopilot_eval import (
    evaluate_goals,
    load_key,
    poll_series,
    recovery_seconds,
    summarize,
    windows,
)
from bench.images import ImageSet, load_images
from bench.loadgen import ClassmeansTarget, LitServeTarget, Target, run_load
from bench.openloop import Timed, arrival_times, run_schedule, segment_schedule
from bench.servers import DEFAULT_MODEL_NAME, REPO, Server, classmeans_server, copy_model, litserve_server
from bench.serving import environment, loadavg

DEFAULT_MODEL = REPO / "model_store" / DEFAULT_MODEL_NAME
CONFIGS = ("full", "autopilot", "autopilot_floor", "litserve")
LITSERVE_PROBE = ((1, 1), (2, 1), (1, 2), (2, 2))  # workers_per_device x threads, as bench/serving_wrk.py
MAX_BATCH, MAX_DELAY_MS = 32, 2.0  # ours' defaults, given to LitServe too


# -- pinning -----------------------------------------------------------------------------------------------

def pin(enabled: bool) -> tuple[list[str] | None, dict[str, Any]]:
    """Pin this process (the load generator) to one CPU and return the ``taskset`` prefix that puts the
    servers on another; degrade to no pinning, with the reason, when that is not possible."""
    info: dict[str, Any] = {"enabled": False}
    if not enabled:
        info["note"] = "--no-pin: server and generator share every CPU"
        return None, info
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        info["note"] = "no CPU affinity on this platform: not pinned"
        return None, info
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        info["note"] = f"only {len(cpus)} CPU usable: not pinned"
        return None, info
    if shutil.which("taskset") is None:
        info["note"] = "taskset not found (util-linux): not pinned"
        return None, info
    server_cpu, gen_cpu = cpus[0], cpus[1]
    try:
        os.sched_setaffinity(0, {gen_cpu})
    except OSError as exc:
        info["note"] = f"sched_setaffinity failed ({exc}): not pinned"
        return None, info
    info.update({"enabled": True, "server_cpus": [server_cpu], "generator_cpus": [gen_cpu],
                 "server": f"taskset -c {server_cpu}", "generator": f"os.sched_setaffinity(0, {{{gen_cpu}}})",
                 "cpus_usable": cpus, "other_cpus_idle_of_ours": cpus[2:]})
    return ["taskset", "-c", str(server_cpu)], info


def affinity_of(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except (AttributeError, OSError):
        return None


# -- the servers -------------------------------------------------------------------------------------------

def post_profiles(srv: Server, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /profiles``; returns status and JSON (never raises on an HTTP error: the report shows it)."""
    with srv.client() as c:
        r = c.post("/profiles", json=body)
    try:
        payload = r.json()
    except ValueError:
        payload = {"text": r.text[:300]}
    return {"status": r.status_code, "body": payload}


def get_profiles(srv: Server) -> dict[str, Any]:
    with srv.client() as c:
        r = c.get("/profiles")
    r.raise_for_status()
    return dict(r.json())


def profile_costs(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per profile: time fraction (expected ms at batch 1 / the full network's), FLOPs fraction, estimate."""
    return {str(p["name"]): {"time_fraction": p.get("time_fraction"), "flops_fraction": p.get("flops_fraction"),
                             "accuracy": p.get("accuracy"), "ms": p.get("ms")}
            for p in listing.get("profiles", [])}


def engage(srv: Server, cfg: str, target_ms: float, floor: float | None) -> dict[str, Any]:
    """Start ``cfg`` from the full network: ``full`` stays there; the autopilots are engaged from it."""
    out = post_profiles(srv, {"name": "full"})
    if cfg == "autopilot":
        out = post_profiles(srv, {"latency_slo_ms": target_ms})
    elif cfg == "autopilot_floor":
        out = post_profiles(srv, {"latency_slo_ms": target_ms, "min_accuracy": floor})
    return {"status": out["status"], "error": out["body"].get("error") if isinstance(out["body"], dict) else None}


# -- one step ----------------------------------------------------------------------------------------------

def closed_loop(url: str, target: Target, images: ImageSet, requests: int, server_pid: int | None = None
                ) -> dict[str, Any]:
    rep = run_load(url, target, images, concurrency=32, requests=requests, warmup=64, time_limit_s=120.0,
                   server_pid=server_pid)
    rep.pop("raw_latencies", None)
    return {"ok_rps": rep["ok_rps"], "p50_ms": 1000 * (rep["latency_seconds"]["p50"] or 0.0),
            "p99_ms": 1000 * (rep["latency_seconds"]["p99"] or 0.0), "requests": requests,
            "non_2xx": rep["counts"]["sent"] - rep["counts"]["ok_2xx"],
            "accuracy": rep["early_exit"]["accuracy"], "mean_flops_fraction": rep["early_exit"]["mean_flops_fraction"],
            "states": rep["swap"]["responses_per_state"]}


class Run:
    """What one benchmark run shares: the plan, images, the store copy, the pinning, the profile table."""

    def __init__(self, args: argparse.Namespace, images: ImageSet, work: Path, prefix: list[str] | None) -> None:
        self.args, self.images, self.work, self.prefix = args, images, work, prefix
        self.store = work / "store"
        copy_model(args.model_dir, self.store)
        self.costs: dict[str, dict[str, Any]] = {}
        self.n_logs = 0
        self.pooled: dict[tuple[str, str], list[Timed]] = {}
        self.pooled_s: dict[tuple[str, str], float] = {}

    def log(self, name: str) -> Path:
        self.n_logs += 1
        return self.work / f"{self.n_logs:02d}-{name}.log"

    def ours(self) -> Any:
        a = self.args
        return classmeans_server(self.store, a.model_dir.name, self.log("classmeans"), prefix=self.prefix,
                                 torch_threads=a.torch_threads, max_batch_size=MAX_BATCH, max_delay_ms=MAX_DELAY_MS)

    def litserve(self, workers: int, threads: int) -> Any:
        return litserve_server(self.args.model_dir, self.log("litserve"), MAX_BATCH, MAX_DELAY_MS / 1000.0, threads,
                               workers_per_device=workers, raw_body=True, prefix=self.prefix)

    def open_step(self, url: str, target: Target, rate: float, seed: int, offset: int,
                  poll: bool) -> dict[str, Any]:
        """``settle_s + step_s`` of Poisson arrivals at ``rate``; figures over the measured part."""
        a = self.args
        dues = arrival_times(rate, a.settle_s + a.step_s, "poisson", seed)
        before = loadavg()
        timed, polls, wall = run_schedule(url, target, self.images, dues, offset=offset, timeout_s=a.timeout_s,
                                          poll_path="/profiles" if poll else None, poll_interval_s=a.poll_s)
        measured = [t for t in timed if t.due >= a.settle_s]
        settle = [t for t in timed if t.due < a.settle_s]
        out = {"rate_rps": rate, "seed": seed, "image_offset": offset, "wall_s": wall,
               "loadavg": {"before": before, "after": loadavg()},
               "summary": summarize(measured, self.images.labels, a.step_s, self.costs),
               "settle": summarize(settle, self.images.labels, a.settle_s, self.costs) if settle else None,
               "_timed": measured}
        if poll:
            series = [p for p in poll_series(polls) if p["t"] >= a.settle_s]
            ops = [p.get("operating") for p in series if p.get("operating")]
            est = [p["estimated_accuracy"] for p in series if p.get("estimated_accuracy") is not None]
            out["polls"] = {"count": len(series), "last": series[-1] if series else None,
                            "median_estimated_accuracy": float(np.median(est)) if est else None,
                            "points_held": {o: ops.count(o) for o in sorted(set(ops), key=ops.count, reverse=True)[:5]}}
        time.sleep(a.pause_s)
        return out

    def record(self, cfg: str, mult: float, step: dict[str, Any]) -> dict[str, Any]:
        key = (cfg, load_key(mult))
        self.pooled.setdefault(key, []).extend(step.pop("_timed"))
        self.pooled_s[key] = self.pooled_s.get(key, 0.0) + self.args.step_s
        return step


def probe_litserve(run: Run) -> dict[str, Any]:
    """LitServe (PyTorch, raw PNG body) closed loop at 32 clients per workers x threads; the best by 2xx/s."""
    rows = []
    for workers, threads in LITSERVE_PROBE:
        with run.litserve(workers, threads) as lit:
            rep = closed_loop(lit.url, LitServeTarget(raw=True), run.images, run.args.probe_requests)
        rows.append({"workers_per_device": workers, "threads": threads, **rep, "loadavg_after": loadavg()})
        print(f"[autopilot] LitServe {workers}x{threads}: {rep['ok_rps']:.0f} req/s", flush=True)
    best = max(rows, key=lambda r: r["ok_rps"] or 0.0)
    return {"clients": 32, "runs": rows, "best": [best["workers_per_device"], best["threads"]]}


def trace(run: Run, srv: Server, cfg: str, capacity: float, target_ms: float, floor: float | None,
          full_est: float | None) -> dict[str, Any]:
    """0.5x -> 3x -> 0.5x of the full network's capacity, ``trace_step_s`` each, polled every ``poll_s``."""
    a = run.args
    segs = [(0.5 * capacity, a.trace_step_s), (3.0 * capacity, a.trace_step_s), (0.5 * capacity, a.trace_step_s)]
    engaged = engage(srv, cfg, target_ms, floor)
    before = loadavg()
    dues = segment_schedule(segs, "poisson", a.seed + 7919)
    timed, polls, wall = run_schedule(srv.url, ClassmeansTarget(), run.images, dues, offset=12345,
                                      timeout_s=a.timeout_s, poll_path="/profiles", poll_interval_s=a.poll_s)
    post_profiles(srv, {"name": "full"})
    end = 3 * a.trace_step_s
    series = poll_series(polls)
    rec = None if full_est is None else recovery_seconds(series, 2 * a.trace_step_s, end + a.timeout_s, full_est)
    time.sleep(a.pause_s)
    return {"config": cfg, "engage": engaged, "segments": [{"rate_rps": r, "seconds": s} for r, s in segs],
            "window_s": a.window_s, "windows": windows(timed, a.window_s, end), "polls": series,
            "polled": any(p.get("estimated_accuracy") is not None for p in series),
            "recovery_s": rec, "recovery_basis": "estimated accuracy of the point held (GET /profiles) back within "
                                                  "0.2 points of the full network's, and held to the end",
            "phases": [summarize([t for t in timed if k * a.trace_step_s <= t.due < (k + 1) * a.trace_step_s],
                                 run.images.labels, a.trace_step_s, run.costs) for k in range(3)],
            "wall_s": wall, "loadavg": {"before": before, "after": loadavg()}}


def run_all(run: Run, results: dict[str, Any]) -> None:
    a = run.args
    with run.ours() as srv:
        results["server_affinity"] = affinity_of(srv.pid)
        listing = get_profiles(srv)
        run.costs = profile_costs(listing)
        full_est = run.costs.get("full", {}).get("accuracy")
        floor = None if full_est is None or a.floor_points is None else max(0.0, full_est - a.floor_points / 100)
        best = max(run.costs.items(), key=lambda kv: kv[1].get("accuracy") or 0.0, default=None)
        results["most_accurate_point"] = None if best is None else {"name": best[0], **best[1]}
        results["model"] = {"name": listing.get("model"), "bundle": listing.get("bundle"),
                            "full_estimated_accuracy": full_est, "floor_accuracy": floor,
                            "timed_profiles": sum(1 for c in run.costs.values() if c.get("time_fraction") is not None),
                            "profiles": len(run.costs)}
        # 1. capacities (closed loop, 32 clients)
        post_profiles(srv, {"name": "full"})
        full_cap = closed_loop(srv.url, ClassmeansTarget(), run.images, a.capacity_requests, srv.pid)
        results["capacity"] = {"full": full_cap}
        if floor is not None:
            sw = post_profiles(srv, {"min_accuracy": floor})
            point = sw["body"].get("active", {}) if isinstance(sw["body"], dict) else {}
            results["capacity"]["floor"] = {"point": point.get("name"), "switch_status": sw["status"],
                                            **closed_loop(srv.url, ClassmeansTarget(), run.images,
                                                          a.capacity_requests, srv.pid)}
            post_profiles(srv, {"name": "full"})
        capacity = full_cap["ok_rps"]
        results["full_capacity_rps"] = capacity
        results["floor_capacity_rps"] = results["capacity"].get("floor", {}).get("ok_rps")
        print(f"[autopilot] capacity: full {capacity:.0f} req/s, floor "
              f"{results['floor_capacity_rps'] or float('nan'):.0f} req/s", flush=True)
        # 2. the target
        if a.target_ms is not None:
            results["target"] = {"target_ms": a.target_ms, "basis": "--target-ms"}
        else:
            cal = run.open_step(srv.url, ClassmeansTarget(), 0.5 * capacity, a.seed - 1, 0, poll=False)
            cal.pop("_timed")
            p99 = cal["summary"]["p99_ms"] or 0.0
            tgt = 5.0 * math.ceil(p99 * a.margin / 5.0)
            results["target"] = {"target_ms": tgt, "full_p99_at_half_load_ms": p99, "margin": a.margin,
                                 "basis": f"the full network's p99 under open Poisson load at 0.5x its capacity "
                                          f"({p99:.1f} ms) x {a.margin}, rounded up to 5 ms", "calibration": cal}
        target_ms = float(results["target"]["target_ms"])
        results["target_ms"] = target_ms
        print(f"[autopilot] target p99 {target_ms:.0f} ms; floor {floor}", flush=True)
        # 3. LitServe's best configuration
        lit_cfg: tuple[int, int] | None = None
        if "litserve" in a.configs:
            if a.litserve_config:
                w, t = a.litserve_config.lower().split("x")
                lit_cfg = (int(w), int(t))
                results["litserve_config"] = {"workers_per_device": lit_cfg[0], "threads": lit_cfg[1],
                                              "chosen_by": "--litserve-config"}
            else:
                results["litserve_probe"] = probe_litserve(run)
                best = results["litserve_probe"]["best"]
                lit_cfg = (int(best[0]), int(best[1]))
                results["litserve_config"] = {"workers_per_device": lit_cfg[0], "threads": lit_cfg[1],
                                              "chosen_by": "probe (closed loop, 32 clients, pinned like ours)"}
        # 4. the rounds
        results["steps"] = []
        cfgs = [c for c in CONFIGS if c in a.configs]
        for rnd in range(a.rounds):
            for k, mult in enumerate(a.loads):
                rate = mult * capacity
                seed, offset = a.seed + 1000 * rnd + k, 997 * k + 331 * rnd
                order = cfgs[rnd % len(cfgs):] + cfgs[:rnd % len(cfgs)]
                for cfg in order:
                    print(f"[autopilot] round {rnd + 1}/{a.rounds}, {mult:g}x = {rate:.0f} req/s: {cfg}", flush=True)
                    if cfg == "litserve":
                        assert lit_cfg is not None
                        with run.litserve(*lit_cfg) as lit:
                            run_load(lit.url, LitServeTarget(raw=True), run.images, concurrency=8, requests=64)
                            step = run.open_step(lit.url, LitServeTarget(raw=True), rate, seed, offset, poll=False)
                    else:
                        eng = engage(srv, cfg, target_ms, floor)
                        step = run.open_step(srv.url, ClassmeansTarget(), rate, seed, offset, poll=True)
                        step["engage"] = eng
                        post_profiles(srv, {"name": "full"})
                    s = step["summary"]
                    print(f"[autopilot]   answered {s['answered_rps']:.0f}/{s['offered_rps']:.0f} req/s, p99 "
                          f"{s['p99_ms'] or float('nan'):.1f} ms, shed {s['shed']}, other {s['other_non_2xx']}, "
                          f"acc {s['accuracy'] or float('nan'):.4f}, load {step['loadavg']['after']}", flush=True)
                    results["steps"].append({"round": rnd + 1, "load": load_key(mult), "config": cfg,
                                             **run.record(cfg, mult, step)})
        # 5. the step-load trace
        results["trace"] = {}
        for cfg in a.trace_configs:
            print(f"[autopilot] trace {cfg}: 0.5x -> 3x -> 0.5x, {a.trace_step_s:g} s each", flush=True)
            results["trace"][cfg] = trace(run, srv, cfg, capacity, target_ms, floor, full_est)
        if not srv.alive():
            raise RuntimeError(f"the server died:\n{srv.log_tail()}")
    rows: dict[str, dict[str, Any]] = {}
    for (cfg, key), timed in run.pooled.items():
        rows.setdefault(cfg, {})[key] = summarize(timed, run.images.labels, run.pooled_s[(cfg, key)], run.costs)
    results["rows"] = rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0, 3.0],
                    help="multiples of the full network's closed-loop capacity (comma-separated)")
    ap.add_argument("--configs", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-s", type=float, default=30.0, help="measured seconds per step")
    ap.add_argument("--settle-s", type=float, default=5.0, help="seconds at the step's rate before it (apart)")
    ap.add_argument("--pause-s", type=float, default=2.0, help="idle seconds after each step")
    ap.add_argument("--trace-step-s", type=float, default=60.0, help="seconds of each step of the trace")
    ap.add_argument("--trace-configs", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    default=["autopilot_floor", "autopilot"], help="configurations traced ('' for none)")
    ap.add_argument("--window-s", type=float, default=1.0, help="trace window (1-2 s)")
    ap.add_argument("--poll-s", type=float, default=0.5, help="GET /profiles period during steps and traces")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="client timeout per request")
    ap.add_argument("--capacity-requests", type=int, default=3000, help="closed-loop requests per capacity run")
    ap.add_argument("--probe-requests", type=int, default=1500, help="closed-loop requests per LitServe probe")
    ap.add_argument("--margin", type=float, default=1.25, help="target = full network's p99 at 0.5x x margin")
    ap.add_argument("--target-ms", type=float, help="set the target instead of measuring it")
    ap.add_argument("--floor-points", type=float, default=5.0, help="the floor: full's estimate minus these points")
    ap.add_argument("--fast-503-ms", type=float, default=20.0, help="a shed 503 is fast when its p99 is below this")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of our server (one pinned CPU)")
    ap.add_argument("--litserve-config", help="WORKERSxTHREADS (e.g. 2x1): skip the LitServe probe")
    ap.add_argument("--seed", type=int, default=20250)
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 3 s steps, 1 round, 4 s trace steps, short capacity runs (not a result)")
    ap.add_argument("--render-only", action="store_true", help="re-render the report from the JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.step_s, args.settle_s, args.pause_s, args.rounds = 3.0, 1.0, 0.5, 1
        args.trace_step_s, args.capacity_requests, args.probe_requests = 4.0, 400, 200
    unknown = (set(args.configs) | set(args.trace_configs)) - set(CONFIGS)
    if unknown or not set(args.trace_configs) <= {"autopilot", "autopilot_floor"}:
        ap.error(f"unknown or untraceable configurations {sorted(unknown | set(args.trace_configs) - set(CONFIGS))}"
                 " (trace: autopilot, autopilot_floor)")
    if args.floor_points is not None and args.floor_points < 0:
        args.floor_points = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.autopilot_report import render

    out_json = args.out / "autopilot.json"
    if args.render_only:
        render(json.loads(out_json.read_text()), args.out)
        return 0
    t0 = time.perf_counter()
    prefix, pinning = pin(args.pin)
    images = load_images(args.images)
    results: dict[str, Any] = {
        "generated_by": "python -m bench.autopilot", "quick": args.quick,
        "model_dir": str(args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO) else args.model_dir),
        "environment": {**environment(args.torch_threads), "loadavg_start": loadavg()},
        "plan": {k: v for k, v in vars(args).items() if k not in ("model_dir", "out")},
        "pinning": pinning, "images": {"count": len(images), "source": images.source},
        "load_generator": {"kind": "open loop, Poisson arrivals (seeded), latency from the scheduled send time",
                           "client": "bench.rawhttp keep-alive connections (up to 512), asyncio",
                           "generator_affinity": affinity_of(os.getpid())},
        "server_settings": {"workers": 1, "torch_threads": args.torch_threads, "max_batch_size": MAX_BATCH,
                            "max_delay_ms": MAX_DELAY_MS},
    }
    with tempfile.TemporaryDirectory(prefix="classmeans-autopilot-") as tmp:
        run = Run(args, images, Path(tmp), prefix)
        try:
            run_all(run, results)
        except Exception:
            for log in sorted(Path(tmp).glob("*.log"))[-2:]:  # what the servers said, for the one running it
                with suppress(OSError):
                    print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", flush=True)
            raise
    results["environment"]["loadavg_end"] = loadavg()
    results["goals"] = evaluate_goals(results, args.fast_503_ms)
    results["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    render(results, args.out)
    for g in results["goals"]:
        mark = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        print(f"[autopilot] {mark:8s} {g['config']:16s} {g['goal']}: {g['figures']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
