"""Small, seeded things to test with: synthetic labelled images and a tiny calibrated model store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.backbones import build_backbone
from service.ingest.labelled import LabelledImages
from service.offline.calibration import CalibrationConfig, HeadConfig
from service.offline.operations import calibrate_model
from service.store.model_dir import ModelSpec, save_model

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = REPO.parent / "shared" / "datasets" / "cifar10"
RESNET56 = "cifar10-resnet56"  # the store's single-network model with trained ICs (the default before the cascade)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n: int, classes: list[str] = CLASSES, seed: int = 0, size: int = 32) -> LabelledImages:
    """Class ``k`` images: a class-specific colour and stripe pattern plus noise (easy to separate)."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    colours = rng.integers(30, 225, size=(k, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        stripes = ((xx * (y % 4 + 1) + yy * (y // 4 + 1)) % 8 < 4)[..., None] * 40
        img = colours[y][None, None, :] + stripes + rng.normal(0, 12, size=(size, size, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return LabelledImages(images, labels.astype(np.int64), list(classes))


def make_tiny_model(model_dir: Path, depth: int = 20, seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)
    arch = {"family": "cifar_resnet", "depth": depth}
    net = build_backbone(arch, len(CLASSES))
    spec = ModelSpec(model_dir.name, arch, list(CLASSES))
    return save_model(model_dir, spec, net)


def make_tiny_store(root: Path, name: str = "tiny", n: int = 300, samples: int = 400,
                    heads: list[HeadConfig] | None = None) -> Path:
    """``root/name``: a random ResNet-20 with one calibrated, active bundle (synthetic data)."""
    model_dir = root / name
    make_tiny_model(model_dir)
    cfg = CalibrationConfig(heads=heads or [HeadConfig("pool4", "euclidean", 1.0)], search="quantile",
                            samples=samples, seed=0, batch_size=100)
    calibrate_model(model_dir, synthetic_images(n), cfg, holdout=100, activate=True)
    return model_dir


def add_tiny_ics(model_dir: Path, n: int = 260, holdout: int = 100, epochs: int = 2, samples: int = 300) -> dict:
    """Train SDN-style ICs on ``model_dir``'s frozen backbone (synthetic data) and store them with threshold
    profiles for every mode, searched on a held-out split with the active bundle's class means; returns
    the summary of :func:`~service.offline.ic_operation.train_ics_for_model`."""
    from service.offline.ic_operation import train_ics_for_model
    from service.offline.ics import ICTrainConfig

    cfg = ICTrainConfig(epochs=epochs, batch_size=64, seed=0)
    return train_ics_for_model(model_dir, synthetic_images(n, seed=5), cfg, holdout=holdout, samples=samples)


def make_tiny_ic_store(root: Path, name: str = "tiny") -> Path:
    """:func:`make_tiny_store` plus a set of internal classifiers with profiles (``ic_prob``, ``ic_entropy``,
    ``combined``, ``cm``)."""
    model_dir = make_tiny_store(root, name)
    add_tiny_ics(model_dir)
    return model_dir


def attach_made_up_timing(model_dir: Path, bundle_id: str | None = None) -> dict:
    """Give a bundle (default: the active one) a timing.json from fixed, made-up stage/head/call times; the exit
    shares are real (the bundle's heads on synthetic images). Returns the document."""
    from service.backbones.preprocess import Normalizer
    from service.earlyexit.time_axis import TimeTable
    from service.offline.evaluation import decision_table_for
    from service.offline.timing import timing_document
    from service.store.active import resolve_bundle
    from service.store.model_dir import load_model
    from service.store.timing import write_timing

    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, bundle_id)
    m = net.num_exits
    tables = {b: TimeTable(b, tuple(float(1 + j % 3) for j in range(m)), tuple(0.2 for _ in range(m - 1)), 0.1 * b)
              for b in (1, 32)}
    table = decision_table_for(net, bundle, synthetic_images(120, seed=3).remap_to(spec.classes),
                               Normalizer(spec.mean, spec.std))
    doc = timing_document(bundle, table, tables, "onnx", 1, {"source": "synthetic", "samples": 120})
    write_timing(model_dir, bundle.bundle_id, doc)
    return doc


GRADED_FRACTIONS = (0.1, 0.2, 0.35, 0.55, 0.8)


def attach_graded_profiles(model_dir: Path) -> dict:
    """Give the active bundle a ladder of made-up profiles whose estimated accuracy rises with their cost on
    both axes, the full network the most accurate, and a made-up time axis to match (``timing.json``): the
    tiny store's own profiles are degenerate (a random network: its first exit is 'perfect' on synthetic
    images, the full network at chance), which leaves an autopilot nothing to move along. Profile ``g{k}``
    costs ``GRADED_FRACTIONS[k]`` of the full network in FLOPs and in time; accuracy ``0.5 + 0.4 sqrt(f)``
    (concave: every point is on both hulls). Returns the timing document."""
    import json

    from service.store.active import resolve_bundle
    from service.store.model_dir import load_model
    from service.store.timing import write_timing

    doc = attach_made_up_timing(model_dir)
    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, None)
    path = model_dir / "bundles" / bundle.bundle_id / "profiles.json"
    stored = json.loads(path.read_text())
    by_name = {p["name"]: p for p in stored["profiles"]}
    full, base = by_name["full"], stored["profiles"][0]
    m = len(full["thresholds"])
    rows, timed = [], {}
    for k, f in enumerate(GRADED_FRACTIONS):
        thr = [1.0 if j < k else float(t) for j, t in enumerate(base["thresholds"])][:m]
        rows.append({"name": f"g{k}", "thresholds": thr, "flops": f * full["flops"], "flops_fraction": f,
                     "accuracy": 0.5 + 0.4 * f ** 0.5})
    rows.append({"name": "full", "thresholds": [1.0] * m, "flops": full["flops"], "flops_fraction": 1.0,
                 "accuracy": 0.9})
    share = doc["profiles"]["full"]["exit_share"]
    for r in rows:
        f = r["flops_fraction"]
        ms = {b: f * float(doc["full_ms"][b]) for b in doc["full_ms"]}
        timed[r["name"]] = {"ms": ms, "time_fraction": {b: f for b in ms}, "exit_share": share}
    path.write_text(json.dumps({"default": "full", "profiles": rows}, indent=2) + "\n")
    doc = {**doc, "profiles": timed}
    write_timing(model_dir, bundle.bundle_id, doc)
    active = json.loads((model_dir / "active.json").read_text())
    active["operating"] = {"a": "full"}
    (model_dir / "active.json").write_text(json.dumps(active, indent=2) + "\n")
    return doc


def make_tiny_cascade_store(root: Path, name: str = "casc", samples: int = 300) -> Path:
    """``root/small`` (a random ResNet-20 with its own normalisation), ``root/big`` (another random ResNet-20)
    and ``root/<name>``, their calibrated cascade (synthetic data); returns the cascade's directory."""
    from service.store.cascade_dir import create_cascade

    torch.manual_seed(1)
    arch = {"family": "cifar_resnet", "depth": 20}
    small = ModelSpec("small", arch, list(CLASSES), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    save_model(root / "small", small, build_backbone(arch, len(CLASSES)))
    make_tiny_model(root / "big")
    create_cascade(root, name, ["small", "big"])
    cfg = CalibrationConfig(heads=[HeadConfig("pool4", "euclidean", 1.0)], search="quantile", samples=samples,
                            seed=0, batch_size=100)
    calibrate_model(root / name, synthetic_images(300), cfg, holdout=100, activate=True)
    return root / name
