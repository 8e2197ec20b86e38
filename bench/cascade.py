"""Build and measure the cascade of the store's models: ``docs/cascade.{md,json}`` and ``docs/img/cascade.png``.

    python -m bench.cascade [--store model_store] [--name cifar10-cascade]
                            [--members cifar10-resnet20,cifar10-resnet56] [--skip-calibration]

Protocol (DESIGN section 6, as for one network): every member was trained on the same 45,000 CIFAR-10 training
images (``train --holdout 5000 --holdout-seed 0``); class means come from those 45,000, thresholds are chosen on
the other 5,000 (which no member saw), and every figure below is measured on the 10,000 test images.

1. each member gets its own bundle if its active one does not load (same head variant as the cascade);
2. ``classmeans cascade create`` + ``calibrate`` (the same operations as the CLI) write the cascade's bundle;
3. on the test set: the cascade's profiles, each member alone (its own class-means exits, costs in fractions of
   the last member's FLOPs), the last member's single-network exits, and the plain two-model cascade (the
   first member's softmax only, every class-means exit off: a threshold grid measured on the test set itself,
   so the baseline is if anything flattered);
4. the issue's goals, and every profile's estimate (selection split) against its test accuracy with the 95 %
   Wilson interval of the estimate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from service.earlyexit.intervals import wilson_interval
from service.ingest.npz import load_npz
from service.offline.calibration import CalibrationConfig, HeadConfig
from service.offline.cascade_calibration import cascade_table
from service.offline.evaluation import evaluate_report, plot_curves, smallest_fraction_within
from service.offline.operations import calibrate_model, evaluate_model
from service.store.active import resolve_bundle
from service.store.bundles import BundleError
from service.store.cascade_dir import create_cascade
from service.store.estimates import read_measured, write_measured
from service.store.model_dir import load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "cifar10"
HEAD = HeadConfig("pool4", "lda", 0.25)  # the embedded ResNet-56's default head variant (docs/results.md)


def _config(samples: int) -> CalibrationConfig:
    return CalibrationConfig(heads=[HEAD], search="refine", samples=samples, seed=0, batch_size=250)


def _ensure_bundle(model_dir: Path, train, samples: int) -> str:
    spec, net = load_model(model_dir)
    try:
        return resolve_bundle(model_dir, spec, net.num_exits, None).bundle_id
    except (BundleError, KeyError, FileNotFoundError) as exc:
        print(f"{model_dir.name}: no loadable active bundle ({exc}); calibrating", flush=True)
    ids, _ = calibrate_model(model_dir, train, _config(samples), holdout=5000, source="train.npz",
                             on_overlap="refuse")
    return ids[0]


def _at(curve: list[dict[str, Any]], fraction: float) -> float | None:
    """Accuracy of the measured hull at a FLOPs fraction (linear between points, time sharing)."""
    pts = sorted((c["flops_fraction"], c["accuracy"]) for c in curve)
    best = None
    for (f0, a0), (f1, a1) in itertools.pairwise(pts):
        if f0 <= fraction <= f1 and f1 > f0:
            best = max(best or 0.0, a0 + (a1 - a0) * (fraction - f0) / (f1 - f0))
    for f, a in pts:
        if f <= fraction:
            best = max(best or 0.0, a)
    return best


def _plain_cascade(table, costs, boundary: int) -> list[dict[str, float]]:
    """The first member's softmax threshold alone (every class-means exit off), a grid on the test set."""
    m1 = table.num_exits - 1
    grid = torch.ones(41, m1)
    levels = torch.cat([torch.linspace(0.3, 0.95, 27), torch.tensor([0.96, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995,
                                                                     0.997, 0.998, 0.999, 0.9995, 0.9999, 0.99999])])
    grid[: len(levels), boundary] = levels
    grid[len(levels):, boundary] = 0.0  # always hand over at the first member: ResNet-20 alone
    flops, acc = table.evaluate(grid, costs)
    return [{"threshold": float(grid[i, boundary]), "flops_fraction": float(flops[i]) / costs.full,
             "accuracy": float(acc[i])} for i in range(len(levels) + 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=REPO / "model_store")
    ap.add_argument("--name", default="cifar10-cascade")
    ap.add_argument("--members", default="cifar10-resnet20,cifar10-resnet56")
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--skip-calibration", action="store_true", help="measure the active cascade bundle as it is")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--render-only", action="store_true", help="re-render cascade.md from cascade.json (and the "
                    "serving rows of cascade_serving/serving_wrk.json)")
    args = ap.parse_args()
    if args.render_only:
        (args.out / "cascade.md").write_text(render(json.loads((args.out / "cascade.json").read_text()), args.out))
        return 0
    members = args.members.split(",")
    t0 = time.time()
    train, test = load_npz(DATA / "train.npz"), load_npz(DATA / "test.npz")
    cascade_dir = args.store / args.name
    member_bundles = {m: _ensure_bundle(args.store / m, train, args.samples) for m in members}
    if not args.skip_calibration:
        create_cascade(args.store, args.name, members, replace=True)
        calibrate_model(cascade_dir, train, _config(args.samples), holdout=5000, source="train.npz",
                        on_overlap="refuse")
    spec, net = load_model(cascade_dir)
    bundle = resolve_bundle(cascade_dir, spec, net.num_exits, None)
    data = test.remap_to(spec.classes)
    table = cascade_table(net, bundle, data)
    report = evaluate_report(bundle, table)
    write_measured(cascade_dir, bundle.bundle_id, report, "test.npz")  # GET /profiles: measured beside estimates
    reference_flops = bundle.costs.full
    alone = {}
    for m in members:
        rep, _ = evaluate_model(args.store / m, test)
        if read_measured(args.store / m, rep["bundle"]) is None:
            write_measured(args.store / m, rep["bundle"], rep, "test.npz")
        scale = float(rep["flops_full"]) / reference_flops
        alone[m] = {"bundle": rep["bundle"], "full_network_accuracy": rep["full_network_accuracy"],
                    "flops_full": rep["flops_full"], "flops_fraction_of_reference": scale,
                    "curve": [{"name": c["name"], "flops_fraction": c["flops_fraction"] * scale,
                               "accuracy": c["accuracy"]} for c in rep["curve"]]}
    boundary = net.offsets[1] - 1
    plain = _plain_cascade(table, bundle.costs, boundary)
    full = report["full_network_accuracy"]
    curve = report["curve"]
    n_sel = int(bundle.config.get("num_selection") or 5000)
    estimates = []
    for p in report["profiles"]:
        lo, hi = wilson_interval(p["selection_accuracy"], n_sel)
        t_lo, t_hi = wilson_interval(p["accuracy"], table.num_samples)
        estimates.append({"name": p["name"], "selection_accuracy": p["selection_accuracy"], "interval95": [lo, hi],
                          "test_accuracy": p["accuracy"], "test_interval95": [t_lo, t_hi],
                          "flops_fraction": p["flops_fraction"], "within": bool(t_lo <= hi and lo <= t_hi),
                          "test_inside_estimate_interval": bool(lo <= p["accuracy"] <= hi)})
    goals = {
        "within_0.5_points_at_flops_fraction": {"value": report["fraction_within_0.5_points"], "goal": 0.45,
                                                "at_most": True},
        "full_accuracy_at_flops_fraction": {"value": smallest_fraction_within(curve, full, 0.0), "goal": 0.55,
                                            "at_most": True},
        "accuracy_at_0.20": {"value": _at(curve, 0.20), "goal": 0.85, "at_most": False},
        "accuracy_at_0.30": {"value": _at(curve, 0.30), "goal": 0.88, "at_most": False},
    }
    for g in goals.values():
        v = g["value"]
        g["met"] = v is not None and (v <= g["goal"] if g["at_most"] else v >= g["goal"])
    misses = [e["name"] for e in estimates if not e["within"]]
    # the default's rule: the cascade serves by default when its hull beats the last member's own exits on the
    # held-out selection split (the data thresholds are chosen on; the test set is not used to decide)
    last = args.store / members[-1]
    lspec, lnet = load_model(last)
    own = resolve_bundle(last, lspec, lnet.num_exits, None)
    sel_cascade = [{"flops_fraction": p.flops_fraction, "accuracy": p.accuracy} for p in bundle.profiles]
    sel_single = [{"flops_fraction": p.flops_fraction, "accuracy": p.accuracy} for p in own.profiles]
    comparison = [{"flops_fraction": f, "cascade": _at(sel_cascade, f), members[-1]: _at(sel_single, f)}
                  for f in (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]
    beats = all((c["cascade"] or 0.0) >= (c[members[-1]] or 0.0) for c in comparison)
    out = {"model": args.name, "members": members, "member_bundles": member_bundles, "bundle": bundle.bundle_id,
           "reference": members[-1], "reference_flops": reference_flops,
           "protocol": "means from 45,000 CIFAR-10 training images, thresholds on the other 5,000 (held out from "
                       "every member's training), figures on the 10,000 test images",
           "environment": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                           "torch": torch.__version__},
           "seconds": round(time.time() - t0, 1), "cascade": report, "alone": alone, "plain_cascade": plain,
           "goals": goals, "estimate_vs_test": estimates, "estimate_misses": misses,
           "selection_comparison": {"rows": comparison, "cascade_beats_single_everywhere": beats,
                                    "single_bundle": own.bundle_id}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cascade.json").write_text(json.dumps(out, indent=2) + "\n")
    series = {"cascade (class means + hand-over), test": [(c["flops_fraction"], c["accuracy"]) for c in curve],
              "plain cascade (softmax hand-over only)": [(c["flops_fraction"], c["accuracy"]) for c in plain]}
    for m, a in alone.items():
        series[f"{m} alone (its class-means exits)"] = [(c["flops_fraction"], c["accuracy"]) for c in a["curve"]]
    (args.out / "img").mkdir(exist_ok=True)
    (args.out / "img" / "cascade.png").write_bytes(plot_curves(
        series, f"{args.name}: accuracy vs FLOPs ({members[-1]} = 1.0), CIFAR-10 test", full_acc=full))
    (args.out / "cascade.md").write_text(render(out, args.out))
    print(json.dumps({"goals": goals, "estimate_misses": misses, "selection_comparison": comparison,
                      "beats": beats}, indent=2))
    return 0


def serving_rows(out_dir: Path) -> list[str]:
    """The served comparison (``python -m bench.serving_wrk --model-dir model_store/<cascade> --rows
    ours_exits_off,ours_target --out docs/cascade_serving``), when that run is there."""
    path = out_dir / "cascade_serving" / "serving_wrk.json"
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    rows = {(r["row"], int(r["clients"])): r.get("wrk") or {} for r in doc.get("rows", [])}

    def fig(row: str, clients: int, key: str) -> float | None:
        w = rows.get((row, clients), {})
        if key == "rps":
            return w.get("ok_rps")
        lat = (w.get("latency_seconds") or {}).get("p50")
        return None if lat is None else 1000.0 * lat

    off1, tgt1 = fig("ours_exits_off", 1, "p50"), fig("ours_target", 1, "p50")
    off32, tgt32 = fig("ours_exits_off", 32, "rps"), fig("ours_target", 32, "rps")
    if None in (off1, tgt1, off32, tgt32):
        return []
    target = doc.get("profiles", {}).get("target")
    return ["", "## Served (one run, the same engine: `classmeans serve` out of the box, wrk)", "",
            "Details: [cascade_serving/serving_wrk.md](cascade_serving/serving_wrk.md). `exits=off` on the cascade "
            "is the last member alone (the first member is not run).", "",
            "| | ResNet-56 alone (exits off) | cascade at the full − 0.5 point " + f"(`{target}`) | ratio | goal |",
            "|---|---|---|---|---|",
            f"| 1-client p50 | {off1:.2f} ms | {tgt1:.2f} ms | {tgt1 / off1:.2f}x | <= 0.6x: "
            f"{'met' if tgt1 / off1 <= 0.6 else 'not met'} |",
            f"| 32 clients | {off32:.0f} req/s | {tgt32:.0f} req/s | {tgt32 / off32:.2f}x | >= 1.8x: "
            f"{'met' if tgt32 / off32 >= 1.8 else 'not met'} |"]


def render(r: dict[str, Any], out_dir: Path | None = None) -> str:
    c = r["cascade"]
    lines = [f"# Cascade of models: {' -> '.join(r['members'])}", "",
             f"Bundle `{r['bundle']}`; {r['protocol']}. FLOPs fractions are of **{r['reference']} alone** "
             f"({r['reference_flops'] / 1e6:.1f} MFLOPs, 2 per multiply-add). Regenerate: `python -m bench.cascade`.",
             "", "![curves](img/cascade.png)", "", "## Goals (test set)", "", "| goal | measured | target | met? |",
             "|---|---|---|---|"]
    names = {"within_0.5_points_at_flops_fraction": f"{r['reference']} full - 0.5 points at FLOPs fraction",
             "full_accuracy_at_flops_fraction": f"{r['reference']} full accuracy or better at FLOPs fraction",
             "accuracy_at_0.20": "accuracy at 0.20", "accuracy_at_0.30": "accuracy at 0.30"}
    for k, g in r["goals"].items():
        v = "-" if g["value"] is None else f"{g['value']:.4f}"
        lines.append(f"| {names[k]} | {v} | {'<=' if g['at_most'] else '>='} {g['goal']} | "
                     f"{'yes' if g['met'] else 'no'} |")
    lines += ["", f"Full network ({r['reference']} alone) on the test set: {c['full_network_accuracy']:.4f}.", "",
              "## The curve against each member alone", "", "| curve | accuracy at 0.20 | at 0.30 | at 0.50 | "
              "fraction within 0.5 points |", "|---|---|---|---|---|"]

    def row(name: str, curve: list[dict[str, Any]]) -> str:
        f = smallest_fraction_within(curve, c["full_network_accuracy"], 0.005)
        cells = [_at(curve, x) for x in (0.2, 0.3, 0.5)]
        return (f"| {name} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in cells)
                + f" | {'-' if f is None else f'{f:.3f}'} |")

    lines.append(row("cascade", c["curve"]))
    lines.append(row("plain cascade (softmax hand-over only, test-set grid)", r["plain_cascade"]))
    for m, a in r["alone"].items():
        lines.append(row(f"{m} alone, its own exits (full {a['full_network_accuracy']:.4f} at "
                         f"{a['flops_fraction_of_reference']:.3f})", a["curve"]))
    sc = r["selection_comparison"]
    last = r["members"][-1]
    lines += ["", "## Why it is the default (held-out selection split, not the test set)", "",
              f"| FLOPs fraction | cascade | {last} alone (its exits) |", "|---|---|---|"]
    for row_ in sc["rows"]:
        cells = ["-" if row_[k] is None else f"{row_[k]:.4f}" for k in ("cascade", last)]
        lines.append(f"| {row_['flops_fraction']:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", "The cascade's selection hull is at least as accurate everywhere: "
              + ("**yes**, so `classmeans serve` serves it." if sc["cascade_beats_single_everywhere"] else
                 "**no**.")]
    lines += ["", "## Estimate (selection split) vs test", "",
              "| profile | FLOPs frac | estimate | 95 % interval | test | within? |", "|---|---|---|---|---|---|"]
    for e in r["estimate_vs_test"]:
        lo, hi = e["interval95"]
        lines.append(f"| {e['name']} | {e['flops_fraction']:.3f} | {e['selection_accuracy']:.4f} | "
                     f"[{lo:.4f}, {hi:.4f}] | {e['test_accuracy']:.4f} | "
                     f"{'yes' if e['test_inside_estimate_interval'] else 'no'} |")
    inside = sum(e["test_inside_estimate_interval"] for e in r["estimate_vs_test"])
    served = serving_rows(out_dir) if out_dir is not None else []
    full_row = next((e for e in r["estimate_vs_test"] if e["name"] == "full"), None)
    low = sum(e["test_accuracy"] < e["interval95"][0] for e in r["estimate_vs_test"])
    shift = ([f"The last member alone scores {full_row['selection_accuracy']:.4f} on the selection split and "
              f"{full_row['test_accuracy']:.4f} on test: the held-out training images are easier than the test "
              f"images, and {low} of the misses are on the optimistic side."] if full_row else [])
    lines += ["", f"{inside} of {len(r['estimate_vs_test'])} test accuracies fall inside their estimate's 95 % "
              "interval; the misses: " + (", ".join(e["name"] for e in r["estimate_vs_test"]
                                                    if not e["test_inside_estimate_interval"]) or "none") + ".",
              "", *shift, *served, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
