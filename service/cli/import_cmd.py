"""``classmeans import``: turn a checkpoint into a model directory (``model.json`` + ``weights.safetensors``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a trained checkpoint (.safetensors, .pt/.pth/.th) as a model dir")
    p.add_argument("checkpoint", help=".safetensors, or a torch.save file read with weights_only=True")
    p.add_argument("--arch", required=True,
                   help="resnet20..110 (CIFAR), a torchvision name (resnet50, mobilenet_v3_large, ...), "
                        "or package.module:function")
    p.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments for a package.module:function")
    p.add_argument("--classes", required=True,
                   help="an ImageFolder directory (its sorted folder names), a file (JSON list or one per line), "
                        "or a comma-separated list, in the order of the classifier's outputs")
    p.add_argument("--out", required=True, help="model directory to create (must not exist, or be empty)")
    p.add_argument("--name", help="model name (default: the directory name)")
    p.add_argument("--input-size", help="network input, N or HxW (default 32 for the CIFAR ResNets)")
    p.add_argument("--resize-shorter", type=int,
                   help="resize the shorter side to this, then centre-crop to --input-size (torchvision "
                        "Resize(256) + CenterCrop(224)); default: resize directly to --input-size")
    p.add_argument("--normalize", choices=["imagenet", "cifar10", "half", "none"],
                   help="mean/std used in training (or give --mean and --std)")
    p.add_argument("--mean", help="three comma-separated values for RGB in [0, 1]")
    p.add_argument("--std", help="three comma-separated values")
    p.add_argument("--trained-on", help="what data trained the backbone (a dataset file/folder name, e.g. "
                                        "train.npz or imagenet); recorded so calibration can check overlap")
    p.add_argument("--trained-images", type=int, help="images in that source (for --held-out)")
    p.add_argument("--held-out", type=int, default=0,
                   help="images of --trained-on kept out of training (classmeans' stratified split_holdout)")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of that held-out split")
    p.set_defaults(func=run)


def _size(value: str | None, arch: str) -> tuple[int, int]:
    from service.backbones import architecture_from_name

    if value is None:
        if architecture_from_name(arch)["family"] == "cifar_resnet":
            return (32, 32)
        raise ValueError("--input-size is required for this architecture (e.g. 224)")
    parts = value.lower().split("x")
    try:
        hw = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        hw = (0, 0)
    if min(hw) <= 0:
        raise ValueError(f"--input-size must be N or HxW with positive integers, got {value!r}")
    return hw


def training_data(args: argparse.Namespace) -> dict | None:
    """``model.json``'s ``extra.training_data``, in the shape ``classmeans train --holdout`` writes."""
    if not args.trained_on:
        if args.held_out or args.trained_images:
            raise ValueError("--held-out / --trained-images describe --trained-on: give it too")
        return None
    if args.held_out and not args.trained_images:
        raise ValueError("--held-out needs --trained-images (the held-out split depends on the set's size)")
    rec = {"source": Path(args.trained_on).name, "images": args.trained_images, "held_out": args.held_out,
           "split": "stratified split_holdout", "seed": args.holdout_seed}
    rec["trained_on"] = (args.trained_images - args.held_out) if args.trained_images else None
    return rec


def run(args: argparse.Namespace) -> int:
    from service.offline.importer import ImportRequest, import_model, normalisation, read_classes

    size = _size(args.input_size, args.arch)
    mean, std = normalisation(args.normalize, args.mean, args.std)
    try:
        kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--arch-kwargs is not JSON: {exc}") from None
    resize = ({"mode": "resize_shorter_center_crop", "shorter": args.resize_shorter} if args.resize_shorter
              else {"mode": "direct"})
    req = ImportRequest(checkpoint=Path(args.checkpoint), arch=args.arch, classes=read_classes(args.classes),
                        out=Path(args.out), input_size=size, mean=mean, std=std, resize=resize, name=args.name,
                        arch_kwargs=kwargs, training_data=training_data(args))
    summary = import_model(req)
    summary.pop("exit_names", None)
    print(json.dumps(summary, indent=2))
    return 0
