"""In-process engine benchmark: eager torch vs the compiled (ONNX Runtime) cascade engine, no HTTP.

    python -m bench.engine --model-dir model_store/cifar10-resnet56 --images 1000 [--threads 1]

Rows, at batch 1 and batch 32 (images/s, the best of ``--passes`` passes over the images): the eager torch
full network (``net.module``), the compiled full network (the cascade runner with every exit off: one
session), and the eager and compiled cascades at the active bundle's default profile and at the profile
nearest the full network's accuracy minus 0.5 points (cheapest within 0.5 points, judged on the bundle's
measured test-set accuracy, else on its selection split). Also each segment's median time per call at
batch 1 and 32 (:func:`~service.serving.compiled.measure_segment_times`), the agreement of the compiled
engine's exits and predictions with the eager one's, the load average before and after, and the CPU.
Writes ``docs/engine_bench.json`` and ``docs/engine_bench.md``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from bench.procstat import cpu_model
from service.backbones.preprocess import Normalizer
from service.earlyexit.policy import ExitPolicy, class_means_policy
from service.serving.cascade import CascadeRunner
from service.serving.compiled import CompiledCascadeRunner, measure_segment_times
from service.store.active import resolve_bundle
from service.store.bundles import read_active
from service.store.estimates import read_measured
from service.store.model_dir import load_model

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "datasets" / "cifar10" / "test.npz"
TOLERANCE = 0.005  # "full - 0.5 points"


def load_images(spec: Any, n: int) -> tuple[torch.Tensor, str]:
    """The first ``n`` CIFAR-10 test images normalised, or seeded noise when the data set is absent."""
    if CIFAR_TEST.is_file():
        from service.ingest.npz import load_npz

        return Normalizer(spec.mean, spec.std)(load_npz(CIFAR_TEST, limit=n).images), "cifar10 test.npz"
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "random normal (no CIFAR-10)"


def pick_target(model_dir: Path, bundle: Any) -> tuple[str, str]:
    """The cheapest profile within 0.5 points of the full network's accuracy, and on which data."""
    measured = read_measured(model_dir, bundle.bundle_id)
    if measured is not None:
        full = float(measured["full_network_accuracy"])
        ok = [(v["flops_fraction"], k) for k, v in measured["profiles"].items()
              if v["accuracy"] >= full - TOLERANCE and k in bundle.profile_names()]
        if ok:
            return min(ok)[1], f"test set ({measured['num_samples']} images, measured.json)"
    rows = bundle.profiles
    full = next((p.accuracy for p in rows if p.name == "full"), max(p.accuracy for p in rows))
    return min((p for p in rows if p.accuracy >= full - TOLERANCE), key=lambda p: p.flops_fraction).name, \
        "selection split (profiles.json)"


def throughput(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int, passes: int) -> float:
    """Images/s of ``fn`` over ``x`` in batches: the best of ``passes`` passes (after 3 warm-up calls)."""
    chunks = [x[i:i + batch] for i in range(0, x.shape[0], batch)]
    for c in chunks[:3]:
        fn(c)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for c in chunks:
            fn(c)
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def agreement(eager: CascadeRunner, compiled: CompiledCascadeRunner, x: torch.Tensor, policy: ExitPolicy
              ) -> dict[str, int]:
    a, b = eager.run(x, policy), compiled.run(x, policy)
    return {"rows": int(x.shape[0]), "same_exit": int((a.exit_index == b.exit_index).sum()),
            "same_pred": int((a.pred == b.pred).sum()),
            "same_exit_and_pred": int(((a.exit_index == b.exit_index) & (a.pred == b.pred)).sum())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model_dir = Path(args.model_dir)
    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, None)
    default = read_active(model_dir)["operating"]["a"]
    target, basis = pick_target(model_dir, bundle)
    x, source = load_images(spec, args.images)
    by_name = {p.name: p for p in bundle.profiles}
    policies = {name: class_means_policy(name, by_name[name].thresholds, bundle.costs) for name in {default, target}}
    full = class_means_policy("full", [1.0] * (net.num_exits - 1), bundle.costs)
    eager = CascadeRunner(net, bundle.heads)
    compiled = CompiledCascadeRunner(net, bundle.heads, threads=args.threads)
    t0 = time.perf_counter()
    compiled.prepare([full, *policies.values()])
    prepare_s = time.perf_counter() - t0

    def eager_full(c: torch.Tensor) -> Any:
        with torch.inference_mode():
            return net.module(c)

    rows: list[dict[str, Any]] = []
    configs: list[tuple[str, str, Callable[[torch.Tensor], Any]]] = [
        ("eager torch, full network", "full", eager_full),
        ("compiled, full network", "full", lambda c: compiled.run(c, full))]
    for name, pol in sorted(policies.items()):
        role = " / ".join(r for r, n in (("default", default), ("full-0.5pt", target)) if n == name)
        configs += [(f"eager cascade, {name} ({role})", name, lambda c, p=pol: eager.run(c, p)),
                    (f"compiled cascade, {name} ({role})", name, lambda c, p=pol: compiled.run(c, p))]
    for label, profile, fn in configs:
        row = {"config": label, "profile": profile}
        for b in args.batch_sizes:
            row[f"images_per_s_b{b}"] = throughput(fn, x, b, args.passes)
        rows.append(row)
        print(json.dumps(row))
    segments = measure_segment_times(compiled, [full, *policies.values()], args.batch_sizes, repeats=args.repeats)
    return {
        "model_dir": str(model_dir), "bundle": bundle.bundle_id, "default_profile": default,
        "target_profile": target, "target_basis": basis, "images": int(x.shape[0]), "image_source": source,
        "threads": args.threads, "batch_sizes": args.batch_sizes, "passes": args.passes,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "onnxruntime": ort.__version__, "engine": compiled.info(),
        "prepare_seconds": prepare_s, "rows": rows,
        "agreement": {name: agreement(eager, compiled, x, p) for name, p in sorted(policies.items())},
        "segments": segments, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "flops_fraction": {name: by_name[name].flops_fraction for name in policies},
    }


def render_md(res: dict[str, Any]) -> str:
    bs = res["batch_sizes"]
    eager_full = res["rows"][0]
    out = ["# In-process engine benchmark (`python -m bench.engine`)", "",
           f"{res['cpu']} ({res['cpu_count']} logical CPUs), {res['threads']} intra-op thread(s); torch "
           f"{res['torch']}, onnxruntime {res['onnxruntime']}; {res['images']} images ({res['image_source']}); "
           f"best of {res['passes']} passes. Load average before {res['loadavg_before'][0]:.2f}, after "
           f"{res['loadavg_after'][0]:.2f} (1 min). Default profile `{res['default_profile']}`; full - 0.5 points: "
           f"`{res['target_profile']}` ({res['target_basis']}).", "",
           "| config | " + " | ".join(f"images/s b{b} | x eager full b{b}" for b in bs) + " |",
           "|---|" + "---:|---:|" * len(bs)]
    for r in res["rows"]:
        cells = [f"{r[f'images_per_s_b{b}']:.0f} | {r[f'images_per_s_b{b}'] / eager_full[f'images_per_s_b{b}']:.2f}"
                 for b in bs]
        out.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    out += ["", "Agreement of the compiled engine with the eager one (same exit and prediction): " + ", ".join(
        f"{k} {v['same_exit_and_pred']}/{v['rows']}" for k, v in res["agreement"].items()) + ".", "",
        "Per segment, median milliseconds per call:", "",
        "| segment | " + " | ".join(f"b{b}" for b in bs) + " |", "|---|" + "---:|" * len(bs)]
    for label, seg in res["segments"]["segments"].items():
        out.append(f"| `{label}` | " + " | ".join(f"{1e3 * seg['seconds'][b]:.3f}" for b in bs) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(REPO / "model_store" / "cifar10-resnet56"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 32])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="calls per segment timing (median)")
    ap.add_argument("--out", default=str(REPO / "docs" / "engine_bench.json"))
    args = ap.parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_md(res))
    print(render_md(res))


if __name__ == "__main__":
    main()
