"""``classmeans calibrate``, ``evaluate`` and ``profiles``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="compute class means, choose thresholds, write a bundle")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help=".npz, ImageFolder dir, .zip or .tar.gz")
    p.add_argument("--holdout", type=float, default=5000,
                   help="held-out samples for threshold selection (count, or fraction if < 1)")
    p.add_argument("--select-on", metavar="FILE",
                   help="a separate selection dataset: class means from all of --data, thresholds chosen on FILE "
                        "(e.g. a checkpoint trained on all of --data; --holdout is then ignored)")
    p.add_argument("--selection", choices=["holdout", "means"], default="holdout",
                   help="holdout: choose thresholds on held-out data (ours); means: on the means data (paper)")
    p.add_argument("--search", choices=["paper", "quantile", "refine"], default="paper")
    p.add_argument("--samples", type=int, default=10_000, help="threshold vectors to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduction", default="full", help="full, gap or poolN (comma list: one bundle each)")
    p.add_argument("--metric", default="euclidean", help="euclidean, diag or lda (comma list)")
    p.add_argument("--temperature", default="1", help="softmax temperature (comma list)")
    p.add_argument("--exits", help="comma list of early exits that get class means (default: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--no-activate", action="store_true", help="write the bundle without activating it")
    p.add_argument("--tag", default="", help="suffix of the bundle id")
    p.add_argument("--measure-forward", type=int, default=0,
                   help="also time a plain forward pass over N images, for the throughput ratio")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: the forward passes run there")
    p.add_argument("--stream", action="store_true",
                   help="ImageFolder directory: decode images batch by batch (bounded memory, any dataset size)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="write the bundle (labelled) even when its selection split overlaps the data that trained "
                        "the backbone (model.json extra.training_data); by default calibration refuses")
    p.set_defaults(func=run_calibrate)

    e = sub.add_parser("evaluate", help="measure the active (or a given) bundle on labelled data")
    e.add_argument("--model-dir", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--bundle", help="bundle id (default: the active one)")
    e.add_argument("--json", help="write the report here (a PNG curve goes next to it)")
    e.add_argument("--limit", type=int)
    e.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: the forward pass runs there")
    e.add_argument("--stream", action="store_true", help="ImageFolder directory: decode batch by batch")
    e.add_argument("--attach", action="store_true",
                   help="attach the measured per-profile accuracy to the bundle (measured.json), shown beside "
                        "the estimate by `classmeans profiles` and GET /profiles")
    e.set_defaults(func=run_evaluate)

    pr = sub.add_parser("profiles", help="list the profiles of the active (or a given) bundle")
    pr.add_argument("--model-dir", required=True)
    pr.add_argument("--bundle")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=run_profiles)


def _bar(desc: str):
    bars: dict[str, tqdm] = {}

    def status(phase: str, i: int, n: int) -> None:
        if phase not in bars:
            for b in bars.values():
                b.close()
            bars[phase] = tqdm(total=n, desc=f"{desc}: {phase}", unit="img", file=sys.stderr)
        bars[phase].n = i
        bars[phase].refresh()
    return status


def _loaded_on(model_dir: Path, device: str):
    """``None`` on the CPU (the operations load the model themselves), else the model moved to ``device``."""
    from service.cli.train_cmd import check_device
    from service.store.model_dir import load_model

    check_device(device)
    if device == "cpu":
        return None
    spec, net = load_model(model_dir)
    net.module.to(device)
    return spec, net


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def run_calibrate(args: argparse.Namespace) -> int:
    """One process, or one of N under ``torchrun --nproc-per-node N -m service.cli.main calibrate ...``: then
    each process computes its share of the batches (gloo on CPU, nccl on GPU) and the first writes the bundle."""
    from service.offline.distributed import init_from_env, shutdown

    dp, device = init_from_env(args.device)
    try:
        return _calibrate(args, dp, device)
    finally:
        shutdown()


def _calibrate(args: argparse.Namespace, dp, device: str) -> int:
    from service.ingest.sources import load_dataset
    from service.offline.calibration import CalibrationConfig, HeadConfig
    from service.offline.operations import calibrate_model
    from service.store.model_dir import read_spec

    spec = read_spec(Path(args.model_dir))
    loaded = _loaded_on(Path(args.model_dir), device)
    data = load_dataset(args.data, image_size=spec.preprocessing, limit=args.limit, stream=args.stream)
    heads = [HeadConfig(r, m, t) for r in args.reduction.split(",") for m in args.metric.split(",")
             for t in _floats(args.temperature)]
    cfg = CalibrationConfig(heads=heads, search=args.search, samples=args.samples, seed=args.seed,
                            batch_size=args.batch_size, selection=args.selection,
                            exits=[int(v) for v in args.exits.split(",")] if args.exits else None)
    holdout = args.holdout if args.holdout < 1 else int(args.holdout)
    select_on = (load_dataset(args.select_on, image_size=spec.preprocessing, stream=args.stream)
                 if getattr(args, "select_on", None) else None)
    main_process = dp is None or dp.is_main
    _ids, summary = calibrate_model(Path(args.model_dir), data, cfg, holdout=holdout,
                                   activate=not args.no_activate, status=_bar("calibrate") if main_process else None,
                                   tag=args.tag, measure_forward=args.measure_forward, loaded=loaded,
                                   source=Path(args.data).name, on_overlap="label" if args.allow_overlap else "refuse",
                                   dp=dp, select_on=select_on,
                                   select_source=Path(args.select_on).name if select_on is not None else None)
    if main_process:
        for w in summary.get("warnings", []):
            print(f"WARNING: {w}", file=sys.stderr)
        print(json.dumps(summary, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from service.ingest.sources import load_dataset
    from service.offline.operations import evaluate_model
    from service.store.model_dir import read_spec

    spec = read_spec(Path(args.model_dir))
    loaded = _loaded_on(Path(args.model_dir), args.device)
    data = load_dataset(args.data, image_size=spec.preprocessing, limit=args.limit, stream=args.stream)
    bar = tqdm(total=len(data), desc="evaluate", unit="img", file=sys.stderr)
    report, png = evaluate_model(Path(args.model_dir), data, args.bundle,
                                 progress=lambda i, n: (setattr(bar, "n", i), bar.refresh()), loaded=loaded)
    bar.close()
    if args.attach:
        from service.store.estimates import write_measured

        write_measured(Path(args.model_dir), report["bundle"], report, Path(args.data).name)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".png").write_bytes(png)
    brief = {k: report[k] for k in ("bundle", "num_samples", "full_network_accuracy", "budgets",
                                     "fraction_within_0.5_points", "fraction_within_1_point")}
    brief["per_exit_ncm_accuracy"] = [round(e["ncm_accuracy"], 4) if e["ncm_accuracy"] is not None else None
                                      for e in report["per_exit"]]
    print(json.dumps(brief, indent=2))
    return 0


def run_profiles(args: argparse.Namespace) -> int:
    from service.store.active import read_active_or_none, resolve_bundle
    from service.store.estimates import estimate_info, provenance, read_measured
    from service.store.model_dir import load_model

    model_dir = Path(args.model_dir)
    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, args.bundle)
    measured = read_measured(model_dir, bundle.bundle_id)
    active = read_active_or_none(model_dir) or {}
    active_name = (active.get("operating") or {}).get("a") if active.get("bundle") == bundle.bundle_id else None
    rows = [{"name": p.name, "accuracy": p.accuracy, "flops_fraction": p.flops_fraction, "flops": p.flops,
             "default": p.name == bundle.default_profile, "active": p.name == active_name,
             "estimate": estimate_info(bundle, p, measured)} for p in bundle.profiles]
    if args.json:
        print(json.dumps({"bundle": bundle.bundle_id, "estimate": provenance(bundle), "profiles": rows}, indent=2))
        return 0
    est = provenance(bundle)
    print(f"bundle {bundle.bundle_id}  (FLOPs = 2 per multiply-add)")
    print(f"estimates: {est.get('samples')} selection samples, {est['label']}; 95 % Wilson intervals")
    if measured:
        print(f"measured: {measured['num_samples']} samples of {measured.get('source')} "
              f"({measured.get('measured_at', '')})")
    print(f"{'profile':<10} {'estimate':>9} {'95% interval':>17} {'measured':>9} {'FLOPs frac':>11} {'MFLOPs':>9}")
    for r in rows:
        e = r["estimate"]
        ci = f"[{e['interval95'][0]:.4f}, {e['interval95'][1]:.4f}]" if e["interval95"] else "-"
        meas = f"{e['measured']['accuracy']:.4f}" if e["measured"] else "-"
        mark = " *active" if r["active"] else (" (default)" if r["default"] else "")
        print(f"{r['name']:<10} {r['accuracy']:>9.4f} {ci:>17} {meas:>9} {r['flops_fraction']:>11.4f} "
              f"{r['flops'] / 1e6:>9.2f}{mark}")
    return 0
