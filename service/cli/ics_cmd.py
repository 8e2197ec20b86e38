"""``classmeans train-ics``: SDN-style internal classifiers on the frozen backbone, plus their profiles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-ics", help="train internal classifiers (SDN, 15..90%% of the FLOPs) on the frozen "
                                         "backbone; search thresholds for the IC decision modes")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help="training set: .npz, ImageFolder dir, .zip or .tar.gz")
    p.add_argument("--epochs", type=int, required=True, help="fixed training budget (passes over the data)")
    p.add_argument("--holdout", type=int, default=5000,
                   help="samples kept out of training to choose thresholds on (0: no profiles)")
    p.add_argument("--bundle", help="class-means bundle for the cm/combined modes (default: the active one)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (SDN IC-only: 1e-3)")
    p.add_argument("--milestones", default="", help="comma list of epochs after which lr is multiplied by 0.1")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=["cached", "online"], default="cached",
                   help="cached: pooled features from one backbone pass; online: augmented batches each epoch")
    p.add_argument("--flip-views", action="store_true", help="cached: add flipped copies (alternate epochs)")
    p.add_argument("--samples", type=int, default=10_000, help="threshold vectors per mode")
    p.add_argument("--no-search", action="store_true", help="train and store only")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--tag", default="")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.ingest.sources import load_dataset
    from service.offline.ic_operation import train_ics_for_model
    from service.offline.ics import ICTrainConfig
    from service.store.model_dir import read_spec

    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    model_dir = Path(args.model_dir)
    spec = read_spec(model_dir)
    data = load_dataset(args.data, image_size=spec.preprocessing, limit=args.limit)
    cfg = ICTrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        milestones=tuple(int(v) for v in args.milestones.split(",") if v),
                        source=args.source, flip_views=args.flip_views)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, i: int, n: int) -> None:
        key = "features" if phase == "features" else "train"
        if key not in bars:
            for b in bars.values():
                b.close()
            bars[key] = tqdm(total=n if key == "features" else cfg.epochs, desc=f"train-ics: {key}",
                             unit="img" if key == "features" else "epoch", file=sys.stderr)
        bar = bars[key]
        if key == "features":
            bar.n = i
        else:
            epoch = int(phase.split()[1].split("/")[0])
            bar.n = epoch - 1
            bar.set_postfix(step=f"{i}/{n}")
        bar.refresh()

    summary = train_ics_for_model(model_dir, data, cfg, holdout=args.holdout, bundle_id=args.bundle,
                                  samples=args.samples, search=not args.no_search, progress=progress, tag=args.tag)
    for b in bars.values():
        b.n = b.total
        b.close()
    print(json.dumps(summary, indent=2))
    return 0
