"""Served == reference on the whole test set: the compiled engine against the torch reference, every profile.

    python -m bench.engine_agreement [--model-dir model_store/cifar10-resnet56] [--images 10000] [--batch 250]

For every class-means profile of the active bundle (and ``full``), the compiled ONNX Runtime cascade runs the
CIFAR-10 test images in batches; the reference's exits and predictions come from one eager pass over the same
images (the same head code the reference runner runs, Eq. 3-7). A row differs when its exit or prediction
differs; every difference must be a tie: a score within 1e-5 of an enabled threshold, or a top-2 tie. Writes
``docs/engine_agreement.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from service.backbones.preprocess import Normalizer
from service.serving.cascade import CascadeRunner
from service.serving.compiled import CompiledCascadeRunner
from service.serving.snapshot import Catalog
from service.store.active import resolve_bundle
from service.store.model_dir import load_model

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-5


@torch.inference_mode()
def reference_table(ref: CascadeRunner, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``top (M, N)`` and ``pred (M, N)`` of every exit's head (the network's softmax last)."""
    tops, preds = [], []
    for lo in range(0, x.shape[0], chunk):
        feats = ref.net.run_stages(x[lo:lo + chunk])
        probs = [ref.cm_heads[j].probabilities(f).float() for j, f in enumerate(feats)]
        probs.append(torch.softmax(ref.net.head(feats[-1]).float(), 1))
        p = torch.stack(probs)  # (M, n, K)
        top2 = p.topk(2, dim=2).values
        tops.append(p.max(2).values)
        preds.append(torch.where((top2[..., 0] - top2[..., 1]) <= EPS, -1, p.argmax(2)))  # -1: an argmax tie
    return torch.cat(tops, 1), torch.cat(preds, 1)


def decide(top: torch.Tensor, pred: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    m, n = top.shape
    exit_index = torch.full((n,), m - 1, dtype=torch.int64)
    near = torch.zeros(n, dtype=torch.bool)
    for j in range(m - 2, -1, -1):
        if float(thresholds[j]) >= 1.0:
            continue
        exit_index[top[j] > thresholds[j]] = j
        near |= (top[j] - thresholds[j]).abs() <= EPS
    chosen = pred[exit_index, torch.arange(n)]
    return exit_index, chosen, near | (chosen < 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(REPO / "model_store" / "cifar10-resnet56"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "cifar10" / "test.npz"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--out", default=str(REPO / "docs" / "engine_agreement.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(args.model_dir)
    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, None)
    catalog = Catalog.build(net, bundle)  # the reference runner and every profile's policy
    ref = catalog.runner
    with np.load(args.data) as d:
        images = d["images"][: args.images]
    x = Normalizer(spec.mean, spec.std)(images)
    t0 = time.perf_counter()
    top, pred = reference_table(ref, x, args.batch)
    compiled = CompiledCascadeRunner(net, bundle.heads, threads=1)
    rows, total_diff, total_near = [], 0, 0
    for name, policy in catalog.policies.items():
        exit_ref, pred_ref, near = decide(top, pred, policy.thresholds[0])
        got_exit, got_pred = [], []
        for lo in range(0, x.shape[0], args.batch):
            r = compiled.run(x[lo:lo + args.batch], policy)
            got_exit.append(r.exit_index)
            got_pred.append(r.pred)
        ge, gp = torch.cat(got_exit), torch.cat(got_pred)
        differ = (ge != exit_ref) | ((gp != pred_ref) & (pred_ref >= 0))
        unexplained = int((differ & ~near).sum())
        rows.append({"profile": name, "differ": int(differ.sum()), "unexplained": unexplained,
                     "near_ties": int(near.sum())})
        total_diff += int(differ.sum())
        total_near += int(near.sum())
        print(f"{name:>9}: {int(differ.sum())} differ ({unexplained} not a tie), {int(near.sum())} near a tie")
    n = x.shape[0] * len(rows)
    doc = {"model": spec.name, "bundle": bundle.bundle_id, "images": int(x.shape[0]), "profiles": len(rows),
           "rows_compared": n, "rows_differing": total_diff, "agreement": 1 - total_diff / n,
           "rows_near_a_tie": total_near, "unexplained": sum(r["unexplained"] for r in rows), "eps": EPS,
           "batch": args.batch, "seconds": round(time.perf_counter() - t0, 1),
           "loadavg": [round(v, 2) for v in os.getloadavg()], "per_profile": rows}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "per_profile"}, indent=2))


if __name__ == "__main__":
    main()
