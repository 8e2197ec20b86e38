"""Test-set numbers of the profiles the service serves in every decision mode (``docs/ic_profiles.md``).

For the model's active bundle (mode ``cm``, class means at every exit) and its newest IC set (modes
``ic_prob``, ``ic_entropy``, ``combined``, profiles chosen on the held-out selection split by
``classmeans train-ics``): held-out (selection) and test accuracy and FLOPs fraction of every served
profile, and what ``POST /profiles {"max_flops_fraction": f, "mode": m}`` serves at f = 0.15 .. 0.50
(a time-shared mix chosen on the selection numbers, measured on test). FLOPs include every head consulted
(IC: linear + pooling; class means: as in the bundle), 2 per multiply-add. Decisions come from the
offline tables, which ``tests/api/test_ic_serving.py`` checks equal to what the service serves.

    python -m bench.ic_profiles [--model-dir model_store/cifar10-resnet56] [--test ../shared/.../test.npz]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.earlyexit import select_by_target
from service.earlyexit.ic_rules import ICCosts, ICDecisionTable
from service.ingest.sources import load_dataset
from service.offline.evaluation import decision_table_for
from service.offline.ic_cache import extract_cache
from service.offline.ics import ic_table_from_cache
from service.serving.engine import Engine
from service.serving.ic_serving import mode_candidates
from service.store.ic_sets import ic_costs, profile_thresholds

BUDGETS = (0.15, 0.20, 0.25, 0.30, 0.50)
REPO = Path(__file__).resolve().parents[1]


def _ic_eval(table: ICDecisionTable, costs: ICCosts, mode: str, profiles: list[dict[str, Any]]
             ) -> tuple[np.ndarray, np.ndarray]:
    t = torch.stack([profile_thresholds(p) for p in profiles])
    flops, acc = table.evaluate(mode, t, costs)
    return flops.numpy() / costs.full, acc.numpy()


def run(model_dir: Path, test_path: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    engine = Engine.load(model_dir)
    snap, store = engine.snapshot, engine.ic_store
    if snap.ic is None or store.ics is None:
        raise SystemExit(f"{model_dir}: no usable IC set ({store.info(None)})")
    test = load_dataset(str(test_path), image_size=engine.spec.input_size).remap_to(engine.spec.classes)
    t0 = time.perf_counter()
    cm_table = decision_table_for(engine.net, snap.bundle, test, engine.normalizer)
    cache = extract_cache(engine.net, test.images, test.labels, engine.normalizer, store.ics.exits,
                          cm_heads=snap.bundle.heads)
    ic_table = ic_table_from_cache(store.ics, cache)
    costs = ic_costs(store.stage_profile, store.ics, snap.bundle.heads)
    seconds = time.perf_counter() - t0
    full = snap.bundle.costs.full
    rows: dict[str, list[dict[str, Any]]] = {}
    bp = snap.bundle.profiles
    f, a = cm_table.evaluate(torch.tensor([p.thresholds for p in bp]), snap.bundle.costs)
    rows["cm"] = [{"name": p.name, "selection_accuracy": p.accuracy, "selection_flops_fraction": p.flops_fraction,
                   "test_accuracy": float(a[i]), "test_flops_fraction": float(f[i]) / full} for i, p in enumerate(bp)]
    stored = json.loads((model_dir / "ics" / str(store.ics_id) / "profiles.json").read_text())
    for mode in ("ic_prob", "ic_entropy", "combined"):
        plist = [p for p in stored["modes"][mode] if p["name"] in snap.ic.profiles]
        ff, aa = _ic_eval(ic_table, costs, mode, plist)
        rows[mode] = [{"name": p["name"], "selection_accuracy": p["accuracy"],
                       "selection_flops_fraction": p["flops_fraction"], "test_accuracy": float(aa[i]),
                       "test_flops_fraction": float(ff[i])} for i, p in enumerate(plist)]
    full_row = next(r for r in rows["cm"] if r["name"] == "full")
    budgets: dict[str, dict[str, Any]] = {}
    for mode, mrows in rows.items():
        by_name = {r["name"]: r for r in mrows} | {"full": full_row}
        budgets[mode] = {}
        for b in BUDGETS:
            try:
                op = select_by_target(mode_candidates(snap.bundle, snap.ic, mode), max_flops_fraction=b)
            except ValueError:
                budgets[mode][str(b)] = None
                continue
            ra, rb = by_name[op.a], by_name[op.b] if op.b else None
            lam = op.lam if rb is not None else 1.0

            def mix(key: str, ra: dict = ra, rb: dict | None = rb, lam: float = lam) -> float:
                return lam * ra[key] + (1 - lam) * (rb[key] if rb is not None else 0.0)

            budgets[mode][str(b)] = {"operating": op.name, "selection_accuracy": op.accuracy,
                                     "test_accuracy": mix("test_accuracy"),
                                     "test_flops_fraction": mix("test_flops_fraction")}
    return {"model": engine.spec.name, "bundle": snap.bundle_id, "ics": store.ics_id, "test_samples": len(test),
            "ic_exits": list(store.ics.exits), "ic_training": store.meta.get("training", {}).get("history", [])[-1:],
            "full_test_accuracy": full_row["test_accuracy"], "table_seconds": round(seconds, 1),
            "profiles": rows, "budgets": budgets}


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Served profiles per decision mode: {r['model']}", "",
        "Generated by `python -m bench.ic_profiles`. Class means: bundle "
        f"`{r['bundle']}` (every exit); ICs: `{r['ics']}` at exits {r['ic_exits']}. Profiles were chosen on "
        "the 5,000-image selection split (held out of the class means and the IC training); test numbers on "
        f"the {r['test_samples']:,} CIFAR-10 test images. FLOPs fractions include every head consulted. "
        f"Full network: {100 * r['full_test_accuracy']:.2f} % test.", "",
        "## What `POST /profiles {\"max_flops_fraction\": f, \"mode\": m}` serves (test accuracy, %)", "",
        "| mode | " + " | ".join(f"f = {b}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for mode, bs in r["budgets"].items():
        cells = [f"{100 * v['test_accuracy']:.1f} ({v['test_flops_fraction']:.3f})" if v else "-"
                 for v in bs.values()]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: test accuracy (test FLOPs fraction) of the operating point chosen on the selection "
              "split for that budget (a time-shared mix of two hull vertices).", ""]
    for mode, rows in r["profiles"].items():
        lines += [f"## Mode `{mode}`: {len(rows)} profiles", "",
                  "| profile | selection acc. | selection FLOPs | test acc. | test FLOPs |", "|---|---|---|---|---|"]
        for p in rows:
            lines.append(f"| {p['name']} | {100 * p['selection_accuracy']:.2f} | "
                         f"{p['selection_flops_fraction']:.3f} | {100 * p['test_accuracy']:.2f} | "
                         f"{p['test_flops_fraction']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REPO / "model_store" / "cifar10-resnet56"))
    ap.add_argument("--test", default=str(REPO.parent / "shared" / "datasets" / "cifar10" / "test.npz"))
    ap.add_argument("--out", default=str(REPO / "docs" / "ic_profiles"))
    args = ap.parse_args()
    r = run(Path(args.model_dir), Path(args.test))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r).split("## Mode")[0])


if __name__ == "__main__":
    main()
