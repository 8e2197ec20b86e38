"""``classmeans timing``: measure a bundle's time axis on this machine and attach it (``timing.json``).

    classmeans timing --model-dir model_store/cifar10-resnet56 --data ../shared/datasets/cifar10/train.npz \\
        --holdout 5000 [--engine auto|onnx|torch] [--threads 1] [--batch-sizes 1,32]

1. the engine that serves (the compiled ONNX Runtime engine on CPU unless told otherwise) times every stage,
   every class-means head and one call, at each batch size (:mod:`service.serving.time_measure`);
2. the bundle's heads are applied to the selection split (the same ``--holdout``/``--seed`` split calibration
   chose thresholds on) and every profile's exit shares are counted (Eq. 6-7);
3. each profile's expected milliseconds per sample = shares x measured times; written atomically to the
   bundle's ``timing.json``, shown by ``GET /profiles`` and used by ``POST /profiles {"max_latency_ms": ...}``.

Run it on the machine (and with the threads) that serves, with nothing else running: the figures are that
machine's. Re-run it after moving the service to another machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("timing", help="measure the bundle's profiles in milliseconds on this machine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help="the calibration data (.npz, ImageFolder dir, .zip or .tar.gz)")
    p.add_argument("--holdout", type=int, default=5000, help="selection split size, as given to calibrate")
    p.add_argument("--seed", type=int, default=0, help="selection split seed, as given to calibrate")
    p.add_argument("--bundle", help="bundle id (default: the active one)")
    p.add_argument("--engine", choices=["auto", "onnx", "torch"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (as one serving worker uses)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--limit", type=int, help="use only the first N samples of --data")
    p.add_argument("--search", action="store_true",
                   help="also search thresholds on the accuracy-time plane (--cost time) and write them as a new "
                        "bundle with the same class means (id ending -time), timed too")
    p.add_argument("--samples", type=int, default=10_000, help="threshold vectors of --search")
    p.add_argument("--activate", action="store_true", help="activate the --search bundle")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from service.backbones.cascade_network import CascadeNetwork
    from service.backbones.preprocess import Normalizer
    from service.ingest.sources import load_dataset
    from service.offline.cascade_calibration import cascade_table
    from service.offline.evaluation import decision_table_for
    from service.offline.timing import timing_document
    from service.serving.time_measure import cascade_time_tables, measure_time_tables, segment_engine
    from service.store.active import resolve_bundle
    from service.store.model_dir import load_model
    from service.store.timing import write_timing

    model_dir = Path(args.model_dir)
    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, args.bundle)
    torch.set_num_threads(max(1, args.threads))
    h, w = spec.input_size
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    cascade = isinstance(net, CascadeNetwork)
    if cascade:
        found = [segment_engine(args.engine, m.net, net.member_heads(bundle.heads, i), args.threads)
                 for i, m in enumerate(net.members)]
        engine_name = "/".join(sorted({n for _, n in found}))
    else:
        engine, engine_name = segment_engine(args.engine, net, bundle.heads, args.threads)
    print(f"timing {bundle.bundle_id} on the {engine_name} engine, {args.threads} thread(s), batch {sizes}",
          file=sys.stderr)
    if cascade:
        tables = cascade_time_tables(net, bundle.heads, [e for e, _ in found], (3, h, w), sizes, args.repeats)
    else:
        tables = measure_time_tables(net, bundle.heads, engine, (3, h, w), sizes, repeats=args.repeats)
    data = load_dataset(args.data, image_size=spec.preprocessing, limit=args.limit).remap_to(spec.classes)
    selection = data.split_holdout(args.holdout, seed=args.seed)[1] if args.holdout else data
    if cascade:
        table = cascade_table(net, bundle, selection)
    else:
        table = decision_table_for(net, bundle, selection, Normalizer(spec.mean, spec.std))
    doc = timing_document(bundle, table, tables, engine_name, args.threads,
                          {"source": Path(args.data).name, "samples": len(selection), "holdout": args.holdout,
                           "seed": args.seed})
    write_timing(model_dir, bundle.bundle_id, doc)
    summary = {"bundle": bundle.bundle_id, "engine": engine_name, "full_ms": doc["full_ms"],
               "profiles": {n: p["ms"] for n, p in doc["profiles"].items()}}
    if args.search:
        summary["time_bundle"] = _search_on_time(args, model_dir, spec, net, bundle, table, tables, engine_name,
                                                 doc["selection"])
    print(json.dumps(summary, indent=2))
    return 0


def _search_on_time(args, model_dir, spec, net, bundle, table, tables, engine_name, selection) -> dict:
    """Thresholds searched on the accuracy-time hull (batch-1 times), written as a new bundle and timed."""
    from service.offline.timing import time_hull_bundle, timing_document
    from service.store.active import activate_bundle
    from service.store.bundles import new_bundle_id
    from service.store.timing import write_timing

    cfg = bundle.config or {}
    tb = time_hull_bundle(bundle, table, tables[min(tables)], new_bundle_id("time"),
                          search=str(cfg.get("search", "refine")), samples=args.samples,
                          seed=int(cfg.get("seed", 0)), tolerance=float(cfg.get("tolerance", 0.005)))
    tb.save(model_dir, spec)
    write_timing(model_dir, tb.bundle_id, timing_document(tb, table, tables, engine_name, args.threads, selection))
    if args.activate:
        activate_bundle(model_dir, tb.bundle_id, spec=spec, num_exits=net.num_exits)
    default = tb.profile(tb.default_profile)
    return {"id": tb.bundle_id, "activated": bool(args.activate), "profiles": len(tb.profiles),
            "default_profile": default.name, "default_accuracy": default.accuracy,
            "default_flops_fraction": default.flops_fraction, "default_selection_ms": default.extra["selection_ms"]}
