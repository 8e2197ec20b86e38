"""``classmeans import``: a user's checkpoint -> a complete, verified model directory.

Steps: read the checkpoint without running code (:mod:`service.offline.checkpoints`), build the named
architecture for the given classes, load the weights strictly, write ``weights.safetensors`` and
``model.json`` (with their sha256, input size, normalisation, resize rule and, when given, what data trained the
backbone) into a staging folder next to the target, reload it from disk as serving would, run one forward pass
(staged forward == the module's own forward == the in-memory network), and only then move it into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.backbones import architecture_from_name, build_backbone, profile_stages
from service.offline.checkpoints import CheckpointError, fit_state_dict, read_checkpoint
from service.store.model_dir import ModelSpec, load_model, save_model, sha256_file

NORMALISATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass
class ImportRequest:
    """Everything ``classmeans import`` needs; ``resize`` is ``model.json``'s ``input.resize``."""

    checkpoint: Path
    arch: str
    classes: list[str]
    out: Path
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: dict[str, Any] = field(default_factory=lambda: {"mode": "direct"})
    name: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] | None = None


def read_classes(value: str) -> list[str]:
    """Classes from an ImageFolder directory (its sorted sub-folder names, as torchvision's ImageFolder), a
    file (a JSON list, or one name per line), or a comma-separated list."""
    path = Path(value)
    if path.is_dir():
        names = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
        if not names:
            raise CheckpointError(f"{path} has no class sub-folders (expected ImageFolder: class_name/file)")
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None
        names = ([str(c) for c in loaded] if isinstance(loaded, list)
                 else [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")])
    else:
        names = [c.strip() for c in value.split(",") if c.strip()]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if len(names) < 2 or dupes:
        raise CheckpointError(f"classes must be at least two distinct names, got {len(names)}"
                              + (f" with duplicates {', '.join(dupes)}" if dupes else ""))
    return names


def normalisation(name: str | None, mean: str | None, std: str | None) -> tuple[tuple, tuple]:
    """A named normalisation (imagenet, cifar10, half, none) or explicit ``--mean`` and ``--std`` (3 values)."""
    if mean or std:
        if not (mean and std):
            raise CheckpointError("give both --mean and --std (three comma-separated values each)")
        m, s = tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(","))
        if len(m) != 3 or len(s) != 3 or min(s) <= 0:
            raise CheckpointError("--mean and --std take three values each, std > 0")
        return m, s
    if name not in NORMALISATIONS:
        raise CheckpointError(f"say how inputs were normalised in training: --normalize "
                              f"{'|'.join(NORMALISATIONS)}, or --mean and --std")
    return NORMALISATIONS[name]


def import_model(req: ImportRequest) -> dict[str, Any]:
    """Write and verify the model directory ``req.out``; returns a summary. Nothing is left behind on failure."""
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory: choose a new --out", code="exists")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists and is not empty: choose a new --out", code="exists")
    arch = architecture_from_name(req.arch)
    if req.arch_kwargs:
        arch["kwargs"] = dict(req.arch_kwargs)
    state = read_checkpoint(req.checkpoint)
    net = build_backbone(arch, len(req.classes), req.input_size[0])
    fit_state_dict(net.module, state, len(req.classes))
    net.module.eval()
    extra: dict[str, Any] = {"imported_from": {"file": Path(req.checkpoint).name,
                                               "sha256": sha256_file(Path(req.checkpoint))}}
    if req.training_data:
        extra["training_data"] = req.training_data
    spec = ModelSpec(name=req.name or out.name, architecture=arch, classes=list(req.classes),
                     input_size=req.input_size, mean=req.mean, std=req.std, extra=extra, resize=dict(req.resize))
    spec.preprocessing  # noqa: B018 -- a bad resize rule fails before anything is written
    staging = out.parent / f".{out.name}.import-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model(staging, spec, net)
        check = verify_model_dir(staging, net)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model_dir": str(out), "architecture": arch, "classes": len(req.classes),
            "input": {"size": list(req.input_size), "resize": spec.preprocessing.describe()},
            "weights_sha256": spec.weights_sha256, **check}


@torch.inference_mode()
def verify_model_dir(model_dir: Path, reference) -> dict[str, Any]:
    """Reload ``model_dir`` as serving would and run one forward pass on a fixed random batch of 2.

    Checks: logits are ``(2, K)`` and finite; the staged forward (every exit, then the head) equals the module's
    own forward; the reloaded weights give the in-memory network's logits.
    """
    spec, net = load_model(model_dir)
    h, w = spec.input_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    logits = net.module(x)
    _, staged = net.forward_all(x)
    if tuple(logits.shape) != (2, spec.num_classes) or not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"the forward pass gave logits of shape {tuple(logits.shape)} (finite: "
                              f"{bool(torch.isfinite(logits).all())}); expected (2, {spec.num_classes})")
    tol = 1e-4 * max(1.0, float(logits.abs().max()))
    if not torch.allclose(staged, logits, rtol=1e-4, atol=tol):
        raise CheckpointError("the staged forward (exit by exit) differs from the model's own forward; the "
                              "architecture's stage list does not match its forward()")
    if not torch.allclose(reference.module.eval()(x), logits, rtol=1e-5, atol=tol):
        raise CheckpointError("the reloaded weights give different logits from the loaded checkpoint")
    prof = profile_stages(net, (h, w))
    return {"exits": net.num_exits, "exit_names": net.exit_names, "gflops_full": prof.total / 1e9,
            "verified": "reloaded from disk; one forward pass: staged == module == checkpoint"}
