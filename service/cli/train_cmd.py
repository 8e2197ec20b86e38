"""``classmeans train``: train a registry backbone and write ``weights.safetensors`` + ``model.json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a backbone on a labelled dataset (CIFAR recipe)")
    p.add_argument("--arch", default="resnet56", help="resnet20/32/44/56/110 (CIFAR), resnet152, ..., or pkg.mod:fn")
    p.add_argument("--data", required=True, help="training set: .npz, ImageFolder dir, .zip or .tar.gz")
    p.add_argument("--test-data", help="optional test set, evaluated after every epoch")
    p.add_argument("--out", required=True, help="model directory to write (model.json + weights.safetensors)")
    p.add_argument("--name", help="model name (default: the directory name)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast: auto uses it only where the CPU has native bf16")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N to train on a GPU")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (the last "
                   "epoch always writes one)")
    p.add_argument("--checkpoint", help="checkpoint path (default: OUT/../checkpoints/NAME.ckpt, outside git)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--limit", type=int, help="use only the first N training images (smoke tests)")
    p.add_argument("--holdout", type=int, default=0,
                   help="keep N images (stratified, --holdout-seed) out of training: the selection split that "
                        "`classmeans calibrate --holdout N` uses; model.json records it")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out split (calibrate's --seed)")
    p.set_defaults(func=run)


def check_device(name: str) -> None:
    """A clear error for a device string torch does not know, or a GPU this machine does not have."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: training runs on cpu or cuda")


def training_data_record(source: str, full_set, held_out, requested: int, seed: int) -> dict:
    """What ``model.json`` says about the backbone's training data, so calibration can check its selection
    split against it: the source, its size, and the stratified held-out split (count, seed, class balance)."""
    return {"source": Path(source).name, "images": len(full_set), "holdout_requested": requested,
            "held_out": len(held_out),
            "split": "stratified split_holdout", "seed": seed,
            "trained_on": len(full_set) - len(held_out)}


def run(args: argparse.Namespace) -> int:
    from service.backbones import architecture_from_name, build_backbone
    from service.backbones.preprocess import Normalizer
    from service.ingest.sources import load_dataset
    from service.offline.training import TrainConfig, train, write_training_report
    from service.store.model_dir import CIFAR10_MEAN, CIFAR10_STD, ModelSpec, save_model

    check_device(args.device)  # before reading any data
    out = Path(args.out)
    name = args.name or out.name
    full_set = load_dataset(args.data, limit=args.limit)
    train_set, held_out = full_set.split_holdout(args.holdout, seed=args.holdout_seed)
    test_set = load_dataset(args.test_data).remap_to(train_set.classes) if args.test_data else None
    h, w = train_set.images.shape[1:3]
    arch = architecture_from_name(args.arch)
    net = build_backbone(arch, len(train_set.classes), h)
    spec = ModelSpec(name=name, architecture=arch, classes=train_set.classes, input_size=(h, w),
                     mean=CIFAR10_MEAN, std=CIFAR10_STD)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      schedule=args.schedule, bf16={'auto': None, 'on': True, 'off': False}[args.bf16],
                      channels_last=not args.no_channels_last,
                      seed=args.seed, threads=args.threads, device=args.device,
                      checkpoint_every=args.checkpoint_every)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.parent.parent / "checkpoints" / f"{name}.ckpt"
    bar = tqdm(total=cfg.epochs, desc="epochs", file=sys.stderr)
    state = {"epoch": 0}

    def progress(p: dict) -> None:
        if p["epoch"] != state["epoch"]:
            bar.n = p["epoch"] - 1
            state["epoch"] = p["epoch"]
        bar.set_postfix(step=f"{p['step']}/{p['steps']}", loss=f"{p['loss']:.3f}", acc=f"{p['acc']:.3f}")

    out.mkdir(parents=True, exist_ok=True)
    summary = train(net, train_set, Normalizer(spec.mean, spec.std), cfg, ckpt, test_set=test_set,
                    resume=args.resume, progress=progress, log_path=ckpt.with_suffix(".log.jsonl"))
    bar.n = cfg.epochs
    bar.close()
    spec.extra = {"training": {k: v for k, v in summary.items() if k != "history"},
                  "training_data": training_data_record(args.data, full_set, held_out, args.holdout,
                                                        args.holdout_seed)}
    save_model(out, spec, net)
    write_training_report(out / "training.json", summary)
    print(json.dumps({"model_dir": str(out), "test_acc": summary.get("test_acc"),
                      "seconds_total": round(summary["seconds_total"], 1)}))
    return 0
