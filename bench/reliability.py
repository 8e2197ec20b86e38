"""The reliability suite, one command: regenerates ``docs/reliability.md`` and ``docs/reliability.json``.

    python -m bench.reliability [--model-dir model_store/cifar10-resnet20] [--out docs] [--quick]
                                [--operating hull-24~hull-25] [--autopilot-slo-ms 60 [--autopilot-floor 0.85]]

Every scenario starts its own ``classmeans serve`` (the fault-injecting harness ``bench/fault_server.py``
where it needs a fault) on 127.0.0.1 over a private copy of the model store, and is bounded in requests
and time. Scenarios (``bench/rel/``): exact overload accounting, 1,000 profile switches and 20 bundle
activations under 32 clients, recompute jobs failing part-way, SIGKILL at each point of a bundle write,
graceful shutdown with requests in flight, Schemathesis against the OpenAPI spec, Hypothesis fuzzing of
the decoders. ``tests/reliability`` runs the same scenarios at CI size on the tiny test model.

``--operating A~B`` first makes the store copy's active point the time-shared mix of hull vertices ``A`` and
``B`` (``POST /profiles {"max_flops_fraction": ...}`` halfway between them, on a temporary server);
``--autopilot-slo-ms`` then engages the latency autopilot there (persisted in ``active.json``, so every
scenario's server starts with it on). The "same answers" checks accept, per image, the answer of a profile
that may serve: the point, either vertex of a mix, or with the autopilot any hull point, provided the
answer names that profile (:func:`bench.rel.common.answer_problems`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.rel import crash, fuzz, overload, schema, shutdown, swap
from bench.rel.common import ScenarioResult
from bench.servers import REPO, classmeans_server, copy_model
from bench.serving import environment

DEFAULT_MODEL = REPO / "model_store" / "cifar10-resnet20"

Scenario = Callable[[Path, Path], ScenarioResult]


def scenarios(quick: bool) -> dict[str, Scenario]:
    """Name -> scenario(model_dir, work_dir); ``quick`` shrinks the counts (CI size)."""
    return {
        "overload": lambda m, w: overload.run(m, w, queue_size=8 if quick else 16, surplus=24 if quick else 48),
        "swap": lambda m, w: swap.run(m, w, switches=200 if quick else 1000, activations=5 if quick else 20,
                                      clients=8 if quick else 32),
        "failing_jobs": lambda m, w: crash.failing_jobs(m, w),
        "sigkill": lambda m, w: crash.sigkill_points(m, w),
        "shutdown": lambda m, w: shutdown.run(m, w, inflight=8 if quick else 24),
        "schemathesis": lambda m, w: schema.run(m, w, max_examples=10 if quick else 50),
        "fuzz": lambda m, w: fuzz.run(w),
    }


def mix_target(profiles: list[dict[str, Any]], a: str, b: str) -> float:
    """The FLOPs fraction halfway between hull vertices ``a`` and ``b`` (a target that the most accurate point
    at most this costly answers with the mix of the two)."""
    by_name = {str(p["name"]): p for p in profiles}
    missing = [n for n in (a, b) if n not in by_name]
    if missing:
        raise ValueError(f"no profile named {missing} (profiles: {sorted(by_name)[:10]} ...)")
    return 0.5 * (float(by_name[a]["flops_fraction"]) + float(by_name[b]["flops_fraction"]))


def prepare_model_dir(model_dir: Path, root: Path, operating: str | None, slo_ms: float | None,
                      floor: float | None) -> tuple[Path, dict[str, Any]]:
    """A copy of ``model_dir`` under ``root`` whose active point is the mix ``operating`` (``A~B``) and/or with
    the autopilot engaged, set through the real server's ``POST /profiles``; returns it and what it holds."""
    root.mkdir(parents=True, exist_ok=True)
    copy_model(model_dir, root, ("*.tmp", "jobs", "locks"))
    info: dict[str, Any] = {"operating_asked": operating, "autopilot_slo_ms": slo_ms, "autopilot_floor": floor}
    with classmeans_server(root, model_dir.name, root.parent / "prepare.log", torch_threads=1,
                           warmup="false") as srv, srv.client() as c:
        if operating is not None:
            a, _, b = operating.partition("~")
            f = mix_target(c.get("/profiles").json()["profiles"], a, b.split("@")[0])
            c.post("/profiles", json={"max_flops_fraction": f}).raise_for_status()
        if slo_ms is not None:
            body: dict[str, Any] = {"latency_slo_ms": slo_ms}
            if floor is not None:
                body["min_accuracy"] = floor
            c.post("/profiles", json=body).raise_for_status()
        now = c.get("/profiles").json()
        info["active"] = now["active"]
        info["autopilot"] = now.get("autopilot")
    return root / model_dir.name, info


def run_all(model_dir: Path, quick: bool, only: list[str] | None) -> list[ScenarioResult]:
    out = []
    for name, fn in scenarios(quick).items():
        if only and name not in only:
            continue
        print(f"[reliability] {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"classmeans-rel-{name}-") as tmp:
            t0 = time.perf_counter()
            try:
                res = fn(model_dir, Path(tmp))
            except Exception as exc:  # a crashed scenario is a failed one, reported with the rest
                res = ScenarioResult(name, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
                res.seconds = time.perf_counter() - t0
        print(f"[reliability] {name}: {'PASS' if res.passed else 'FAIL'} ({res.seconds:.0f} s)", flush=True)
        for f in res.failures():
            print(f"    {f[:300]}", flush=True)
        out.append(res)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict | list):
        return "`" + json.dumps(v)[:200] + "`"
    return str(v)


def _prepared_lines(prepared: dict[str, Any] | None) -> list[str]:
    if not prepared:
        return []
    active = prepared.get("active") or {}
    auto = prepared.get("autopilot") or {}
    return [f"Store prepared before the scenarios: active point `{active.get('name')}`"
            + (f" (asked: `{prepared['operating_asked']}`)" if prepared.get("operating_asked") else "")
            + (f"; autopilot engaged (target {prepared['autopilot_slo_ms']} ms, floor "
               f"{prepared.get('autopilot_floor')}; server says enabled={auto.get('enabled')})"
               if prepared.get("autopilot_slo_ms") is not None else "")
            + ". The same-answers checks accept, per image, the answer of the profile the answer names when it "
              "may serve (the point, a vertex of the mix, or with the autopilot any hull point).", ""]


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Reliability",
        "",
        "Generated by `python -m bench.reliability` (this file and `docs/reliability.json`); do not edit by hand. "
        "CI runs the same scenarios at a smaller size on the tiny test model (`tests/reliability`).",
        "",
        f"Model: `{report['model_dir']}`; {env['cpu']}, {env['cpu_count']} cores; git "
        f"`{(env['git_sha'] or '?')[:10]}`{' (uncommitted changes)' if env['git_dirty'] else ''}; {env['date']}. "
        "Every server is a real `classmeans serve` on 127.0.0.1 over a private copy of the store (faults through "
        "`bench/fault_server.py`, which wraps a few functions of the real server); every loop is bounded.",
        "",
        *_prepared_lines(report.get("prepared")),
        "| scenario | result | checks | time |",
        "|---|---|---|---|",
    ]
    for s in report["scenarios"]:
        n_ok = sum(c["passed"] for c in s["checks"])
        lines.append(f"| {s['name']} | {'**pass**' if s['passed'] else '**FAIL**'} | {n_ok}/{len(s['checks'])} | "
                     f"{s['seconds']:.0f} s |")
    for s in report["scenarios"]:
        lines += ["", f"## {s['name']}", ""]
        if s["error"]:
            lines += ["```", s["error"], "```", ""]
        if s["figures"]:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in s["figures"].items()]
            lines.append("")
        lines += [f"- {'✓' if c['passed'] else '✗'} {c['name']}" + ("" if c["passed"] else f": {c['detail'][:300]}")
                  for c in s["checks"]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--quick", action="store_true", help="CI sizes (what tests/reliability runs)")
    ap.add_argument("--only", nargs="*", help=f"scenario names: {', '.join(scenarios(False))}")
    ap.add_argument("--operating", help="run on a copy whose active point is the mix of these two hull vertices "
                                        "(A~B, e.g. hull-24~hull-25)")
    ap.add_argument("--autopilot-slo-ms", type=float, help="run with the latency autopilot engaged at this target")
    ap.add_argument("--autopilot-floor", type=float, help="the autopilot's min_accuracy (its floor)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    prepared: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="classmeans-rel-prepared-") as tmp:
        model_dir = args.model_dir
        if args.operating or args.autopilot_slo_ms is not None:
            model_dir, prepared = prepare_model_dir(args.model_dir, Path(tmp) / "store", args.operating,
                                                    args.autopilot_slo_ms, args.autopilot_floor)
            print(f"[reliability] prepared store: active {prepared['active'].get('name')}, autopilot "
                  f"{(prepared.get('autopilot') or {}).get('enabled')}", flush=True)
        results = run_all(model_dir, args.quick, args.only)
    model = args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO) else args.model_dir
    report = {"model_dir": str(model), "quick": args.quick, "environment": environment(1), "prepared": prepared,
              "passed": all(r.passed for r in results), "scenarios": [r.to_json() for r in results],
              "wall_seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "reliability.md").write_text(render_markdown(report))
    print(f"[reliability] {'all passed' if report['passed'] else 'FAILURES'} in {report['wall_seconds']:.0f} s")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
