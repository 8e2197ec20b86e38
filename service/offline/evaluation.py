"""Evaluate a bundle on labelled data: per-exit accuracy, the accuracy-FLOPs curve, fixed budgets.

Profiles were chosen on the selection split; here they are only *measured*. A budget between two
profiles is met by time sharing with the mix chosen from the selection numbers, and its accuracy on
this data is the same mix of the two profiles' accuracies here.
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import numpy as np
import torch

from service.backbones import StagedNetwork
from service.backbones.preprocess import Normalizer
from service.earlyexit import DecisionTable, ExitHead, Profile, select_by_target
from service.earlyexit.hull import TargetUnreachable
from service.ingest.labelled import LabelledImages
from service.offline.features import iter_exit_features
from service.store.bundle_model import Bundle

BUDGETS = (0.15, 0.20, 0.25, 0.30, 0.50)


def decision_table_for(net: StagedNetwork, bundle: Bundle, data: LabelledImages, norm: Normalizer,
                       batch_size: int = 250, progress=None) -> DecisionTable:
    return heads_decision_table(net, bundle.heads, data, norm, batch_size, progress)


def heads_decision_table(net: StagedNetwork, heads: dict[int, ExitHead], data: LabelledImages, norm: Normalizer,
                         batch_size: int = 250, progress=None) -> DecisionTable:
    """``top (N, M)`` and ``pred (N, M)`` of ``heads`` (by exit; an exit without one: top 0) and the network's own
    softmax at its classifier, on ``data``."""
    m = net.num_exits
    top = torch.zeros(len(data), m)
    pred = torch.zeros(len(data), m, dtype=torch.int64)
    lo = 0
    for feats, logits, _ in iter_exit_features(net, data.images, data.labels, norm, batch_size, progress):
        hi = lo + logits.shape[0]
        for j, head in heads.items():
            top[lo:hi, j], pred[lo:hi, j] = head.probabilities(feats[j]).max(1)
        top[lo:hi, m - 1], pred[lo:hi, m - 1] = torch.softmax(logits.float(), 1).max(1)
        lo = hi
    return DecisionTable(top, pred, torch.from_numpy(data.labels))


def measure_profiles(bundle: Bundle, table: DecisionTable) -> list[dict[str, Any]]:
    t = torch.tensor([p.thresholds for p in bundle.profiles], dtype=torch.float32)
    flops, acc = table.evaluate(t, bundle.costs)
    out = []
    for p, f, a in zip(bundle.profiles, flops.tolist(), acc.tolist(), strict=True):
        out.append({"name": p.name, "selection_accuracy": p.accuracy, "selection_flops_fraction": p.flops_fraction,
                    "accuracy": a, "flops": f, "flops_fraction": f / bundle.costs.full,
                    "exit_share": table.exit_histogram(torch.tensor(p.thresholds)).tolist()})
    return out


def _hull_profiles(bundle: Bundle) -> list[Profile]:
    ps = sorted(bundle.profiles, key=lambda p: p.flops_fraction)
    chain, best = [], -1.0
    for p in ps:
        if p.accuracy > best:
            chain.append(p)
            best = p.accuracy
    return chain


def at_budget(bundle: Bundle, measured: dict[str, dict[str, Any]], fraction: float) -> dict[str, Any] | None:
    try:
        op = select_by_target(_hull_profiles(bundle), max_flops_fraction=fraction)
    except TargetUnreachable:
        return None
    a = measured[op.a]
    if op.b is None:
        return {"budget": fraction, "operating": op.name, "accuracy": a["accuracy"],
                "flops_fraction": a["flops_fraction"]}
    b = measured[op.b]
    return {"budget": fraction, "operating": op.name,
            "accuracy": op.lam * a["accuracy"] + (1 - op.lam) * b["accuracy"],
            "flops_fraction": op.lam * a["flops_fraction"] + (1 - op.lam) * b["flops_fraction"]}


def smallest_fraction_within(curve: list[dict[str, Any]], full_acc: float, points: float) -> float | None:
    """Smallest FLOPs fraction on the measured curve (linear between points) with accuracy >= full - points."""
    target = full_acc - points
    pts = sorted((c["flops_fraction"], c["accuracy"]) for c in curve)
    best = None
    for (f0, a0), (f1, a1) in itertools.pairwise(pts):
        if a0 >= target:
            best = f0 if best is None else min(best, f0)
        elif a1 >= target and a1 != a0:
            f = f0 + (target - a0) * (f1 - f0) / (a1 - a0)
            best = f if best is None else min(best, f)
    if pts and pts[-1][1] >= target:
        best = pts[-1][0] if best is None else min(best, pts[-1][0])
    return best


def evaluate_report(bundle: Bundle, table: DecisionTable) -> dict[str, Any]:
    measured = measure_profiles(bundle, table)
    by_name = {m["name"]: m for m in measured}
    full_acc = table.per_exit_accuracy()[-1]
    per_exit = table.per_exit_accuracy()
    curve = [by_name[p.name] for p in _hull_profiles(bundle)]
    return {
        "bundle": bundle.bundle_id,
        "num_samples": table.num_samples,
        "flops_full": bundle.costs.full,
        "flops_unit": "FLOPs, 2 per multiply-add",
        "full_network_accuracy": full_acc,
        "per_exit": [{"index": j, "name": bundle.exit_names[j], "ncm_accuracy": per_exit[j] if (
            j in bundle.heads or j == bundle.num_exits - 1) else None,
            "backbone_flops_fraction": bundle.costs.backbone_cum[j] / bundle.costs.full}
            for j in range(bundle.num_exits)],
        "profiles": measured,
        "curve": [{"name": c["name"], "flops_fraction": c["flops_fraction"], "accuracy": c["accuracy"]}
                  for c in curve],
        "budgets": [b for b in (at_budget(bundle, by_name, f) for f in BUDGETS) if b is not None],
        "fraction_within_0.5_points": smallest_fraction_within(curve, full_acc, 0.005),
        "fraction_within_1_point": smallest_fraction_within(curve, full_acc, 0.01),
        "default_profile": bundle.default_profile,
        "default_profile_measured": by_name[bundle.default_profile],
    }


def plot_curves(series: dict[str, list[tuple[float, float]]], title: str, full_acc: float | None = None,
                paper: dict[str, list[tuple[float, float]]] | None = None) -> bytes:
    """PNG bytes of accuracy vs FLOPs fraction for each named series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    for name, pts in (paper or {}).items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="x", ms=4, label=name)
    if full_acc is not None:
        ax.axhline(full_acc, color="grey", lw=0.8, ls=":", label=f"full network {full_acc:.4f}")
    ax.set_xlabel("FLOPs fraction of the full network (2 FLOPs per multiply-add)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def curve_points(report: dict[str, Any]) -> list[tuple[float, float]]:
    return [(c["flops_fraction"], c["accuracy"]) for c in report["curve"]]


def search_cloud(flops: np.ndarray, acc: np.ndarray) -> list[tuple[float, float]]:
    return list(zip(flops.tolist(), acc.tolist(), strict=True))
