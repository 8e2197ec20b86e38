"""Internal classifiers (ICs) on a frozen backbone: training, IC decision tables (the feature cache is
:mod:`service.offline.ic_cache`; train-and-store for a model, :mod:`service.offline.ic_operation`).

Training follows SDN's IC-only mode (Kaya et al. 2019): the backbone is frozen, the ICs are trained with
Adam (lr 1e-3) on the sum of their cross-entropies (equal weights). Unlike SDN's code, the backbone is
put in ``eval()`` (its BatchNorm uses and keeps its running statistics) and ``requires_grad_(False)``, so
the backbone the class means were computed on is left bit-for-bit unchanged.

Two feature sources:

* ``cached`` (default): one inference pass stores, for every training image and every IC exit, the
  max-pooled and the average-pooled ``4 x 4`` maps (SDN's reduction kernel); the learnable mix
  ``alpha * max + (1 - alpha) * avg`` is linear in them, so training on the cache is exactly training
  the IC on the backbone's features, at a fraction of the cost (no backbone pass per epoch). Images are
  un-augmented (``flip_views=True`` adds horizontally flipped copies, used on alternate epochs).
* ``online``: every batch is augmented (random crop + flip) and run through the frozen backbone.

On disk: ``model_store/<model>/ics/<id>/`` with ``ics.safetensors`` (``ic{i}.alpha``,
``ic{i}.linear.weight``, ``ic{i}.linear.bias``, float32), ``ics.json`` (format, backbone weights sha256,
classes, IC exits with their input shapes and FLOPs, training configuration and history, the tensors'
sha256) and, when thresholds were searched, ``profiles.json`` (one list of profiles per decision mode, with
the bundle whose class means the ``cm``/``combined`` modes used). Written into a ``.tmp`` sibling and
published with one ``os.replace``, like bundles; bundles themselves are left untouched (immutable), and a
set of ICs names the bundle it was calibrated against.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.backbones import StagedNetwork, StageProfile
from service.backbones.internal_classifiers import SDN_TARGETS, ICSet, place_ics
from service.backbones.preprocess import Normalizer
from service.earlyexit.ic_rules import ICDecisionTable
from service.ingest.labelled import LabelledImages
from service.offline.ic_cache import FeatureCache, extract_cache
from service.offline.training import augment_batch

ProgressFn = Callable[[str, int, int], None]



# ------------------------------------------------------------------------------------------ the training


@dataclass
class ICTrainConfig:
    """``epochs``: the fixed budget (passes over the training images). Adam, lr ``lr``, multiplied by
    ``gamma`` after each epoch listed in ``milestones`` (SDN's IC-only recipe: 25 epochs, ``(15,)``)."""

    epochs: int = 25
    lr: float = 1e-3
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    source: str = "cached"  # or "online"
    flip_views: bool = False
    targets: tuple[float, ...] = SDN_TARGETS
    snapshot_epochs: tuple[int, ...] = ()  # also return copies of the ICs after these epochs
    threads: int | None = 1  # torch threads while training on a cache (None: leave as is)


@dataclass
class ICTrainResult:
    ics: ICSet
    history: list[dict[str, Any]]
    seconds: float
    extract_seconds: float
    snapshots: dict[int, ICSet] = field(default_factory=dict)

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([h["seconds"] for h in self.history])) if self.history else 0.0


class torch_threads:
    """Context: ``torch.set_num_threads(n)`` inside, the previous value restored after (``None``: no change).

    Training small heads on cached features is a stream of tiny matmuls; on a shared 2-core CPU one thread
    was 15x faster than two (measured: 1.2 s vs 16.9 s per epoch of 5,000 samples), because two OpenMP
    threads spend their time waiting for each other.
    """

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


def lr_at(cfg: ICTrainConfig, epoch: int) -> float:
    """lr for 0-based ``epoch``."""
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, batch: int,
                   clamp_alpha: ICSet | None = None) -> float:
    """One step on ``loss`` (the batch's mean loss); SDN's mixing weight ``alpha`` of every IC of
    ``clamp_alpha`` is kept in [0, 1]. Returns ``loss * batch`` for the epoch's running sum."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if clamp_alpha is not None:
        with torch.no_grad():
            for ic in clamp_alpha.ics:
                ic.alpha.clamp_(0.0, 1.0)  # type: ignore[union-attr]
    return float(loss.detach()) * batch


def _clone(ics: ICSet) -> ICSet:
    out = ICSet(ics.exits, [ic.in_shape for ic in ics.ics], ics.num_classes, seed=None)  # type: ignore[union-attr]
    out.load_state_dict(ics.state_dict())
    return out.eval()


def _batch_tensor(a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a[idx])).float()


def train_on_cache(ics: ICSet, cache: FeatureCache, cfg: ICTrainConfig, val: FeatureCache | None = None,
                   progress: ProgressFn | None = None) -> ICTrainResult:
    """Train ``ics`` (in place) on a pooled cache; returns the history (loss, accuracy per IC, seconds)."""
    with torch_threads(cfg.threads):
        return _train_on_cache(ics, cache, cfg, val, progress)


def cache_batches(rng: np.random.Generator, n_view: int, views: int, epoch: int, batch_size: int
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """``(step, row indices)`` of one epoch over a feature cache that stacks ``views`` copies of ``n_view``
    images: a fresh permutation of view ``epoch % views``'s rows (one ``rng.permutation`` per epoch), cut into
    batches, each sorted so that gathering rows from a memory map reads forward."""
    perm = rng.permutation(n_view) + (epoch % views) * n_view
    for s in range(math.ceil(n_view / batch_size)):
        yield s, np.sort(perm[s * batch_size:(s + 1) * batch_size])


def _train_on_cache(ics: ICSet, cache: FeatureCache, cfg: ICTrainConfig, val: FeatureCache | None,
                    progress: ProgressFn | None) -> ICTrainResult:
    if tuple(cache.exits) != tuple(ics.exits):
        raise ValueError(f"cache exits {cache.exits} differ from IC exits {ics.exits}")
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(ics.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_view = len(cache) // cache.views
    labels = np.asarray(cache.labels)
    # Into memory once: a random batch from a memory map would touch the disk every step.
    pmax = [np.asarray(a) for a in cache.pooled_max]
    pavg = [np.asarray(a) for a in cache.pooled_avg]
    history: list[dict[str, Any]] = []
    snapshots: dict[int, ICSet] = {}
    steps = math.ceil(n_view / cfg.batch_size)
    t_all = time.perf_counter()
    for epoch in range(cfg.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, epoch)
        ics.train()
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for s, idx in cache_batches(gen, n_view, cache.views, epoch, cfg.batch_size):
            y = torch.from_numpy(labels[idx])
            loss = sum(F.cross_entropy(ic.forward_pooled(_batch_tensor(pmax[i], idx), _batch_tensor(pavg[i], idx)), y)
                       for i, ic in enumerate(ics.ics))
            loss_sum += optimiser_step(opt, loss, len(idx), clamp_alpha=ics)  # type: ignore[arg-type]
            seen += len(idx)
            if progress is not None and s % 50 == 0:
                progress(f"epoch {epoch + 1}/{cfg.epochs}", s, steps)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "lr": lr_at(cfg, epoch),
                                  "seconds": time.perf_counter() - t0}
        if val is not None:
            record["val_accuracy"] = ic_accuracy(ics, val)
        history.append(record)
        if epoch + 1 in cfg.snapshot_epochs:
            snapshots[epoch + 1] = _clone(ics)
    ics.eval()
    return ICTrainResult(ics, history, time.perf_counter() - t_all, 0.0, snapshots)


@torch.inference_mode()
def ic_outputs(ics: ICSet, cache: FeatureCache, batch_size: int = 2048) -> list[torch.Tensor]:
    """Softmax of every IC on a cache: ``E`` tensors ``(N, K)`` float32."""
    ics.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in ics.ics]
    for lo in range(0, len(cache), batch_size):
        idx = np.arange(lo, min(len(cache), lo + batch_size))
        for i, ic in enumerate(ics.ics):
            logits = ic.forward_pooled(torch.from_numpy(np.asarray(cache.pooled_max[i][idx])).float(),
                                       torch.from_numpy(np.asarray(cache.pooled_avg[i][idx])).float())
            outs[i].append(torch.softmax(logits, 1))
    return [torch.cat(o) for o in outs]


def ic_accuracy(ics: ICSet, cache: FeatureCache) -> list[float]:
    y = torch.from_numpy(np.asarray(cache.labels))
    return [float((p.argmax(1) == y).double().mean()) for p in ic_outputs(ics, cache)]


def ic_table_from_cache(ics: ICSet, cache: FeatureCache) -> ICDecisionTable:
    """The decision table of ``ics`` (+ class means when the cache has them) on a cached split."""
    final = torch.softmax(torch.from_numpy(np.asarray(cache.logits)).float(), 1)
    labels = torch.from_numpy(np.asarray(cache.labels))
    table = ICDecisionTable.from_outputs(ic_outputs(ics, cache), final, labels)
    if cache.cm_top is not None and cache.cm_pred is not None:
        table.cm_prob = torch.from_numpy(np.array(cache.cm_top)).float()
        table.cm_pred = torch.from_numpy(np.array(cache.cm_pred)).long()
    return table


class FrozenBackbone:
    """Context: backbone in ``eval()`` with ``requires_grad_(False)``; restores the flags on exit."""

    def __init__(self, net: StagedNetwork) -> None:
        self.net = net

    def __enter__(self) -> StagedNetwork:
        self.flags = [p.requires_grad for p in self.net.module.parameters()]
        self.was_training = self.net.module.training
        self.net.module.eval()
        self.net.module.requires_grad_(False)
        return self.net

    def __exit__(self, *exc: object) -> None:
        for p, f in zip(self.net.module.parameters(), self.flags, strict=True):
            p.requires_grad_(f)
        self.net.module.train(self.was_training)


def train_online(net: StagedNetwork, ics: ICSet, data: LabelledImages, norm: Normalizer, cfg: ICTrainConfig,
                 progress: ProgressFn | None = None) -> ICTrainResult:
    """Augmented batches (random crop + flip) through the frozen backbone (BN in eval mode), ICs trained."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(ics.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    n = len(data)
    steps = math.ceil(n / cfg.batch_size)
    last = max(ics.exits)
    history: list[dict[str, Any]] = []
    snapshots: dict[int, ICSet] = {}
    t_all = time.perf_counter()
    with FrozenBackbone(net):
        for epoch in range(cfg.epochs):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch)
            ics.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen)
            loss_sum = 0.0
            for s in range(steps):
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                x = norm(augment_batch(images[idx], gen))
                with torch.no_grad():
                    feats = net.run_stages(x, upto=last)
                y = labels[idx]
                loss = sum(F.cross_entropy(ic(feats[e]), y) for ic, e in zip(ics.ics, ics.exits, strict=True))
                loss_sum += optimiser_step(opt, loss, len(idx), clamp_alpha=ics)  # type: ignore[arg-type]
                if progress is not None and s % 20 == 0:
                    progress(f"epoch {epoch + 1}/{cfg.epochs}", s, steps)
            history.append({"epoch": epoch + 1, "loss": loss_sum / n, "lr": lr_at(cfg, epoch),
                            "seconds": time.perf_counter() - t0})
            if epoch + 1 in cfg.snapshot_epochs:
                snapshots[epoch + 1] = _clone(ics)
    ics.eval()
    return ICTrainResult(ics, history, time.perf_counter() - t_all, 0.0, snapshots)


def new_ics(net: StagedNetwork, stage_profile: StageProfile, num_classes: int, cfg: ICTrainConfig) -> ICSet:
    placement = place_ics(stage_profile, cfg.targets)
    return ICSet(placement.exits, [stage_profile.shapes[j] for j in placement.exits], num_classes, cfg.seed)


def train_ics(net: StagedNetwork, stage_profile: StageProfile, data: LabelledImages, norm: Normalizer,
              cfg: ICTrainConfig, val: LabelledImages | None = None, progress: ProgressFn | None = None,
              cache: FeatureCache | None = None) -> ICTrainResult:
    """Place fresh ICs (seeded) and train them for ``cfg.epochs`` on the frozen backbone."""
    ics = new_ics(net, stage_profile, len(data.classes), cfg)
    if cfg.source == "online":
        return train_online(net, ics, data, norm, cfg, progress)
    if cfg.source != "cached":
        raise ValueError(f"unknown IC training source {cfg.source!r}")
    t0 = time.perf_counter()
    with FrozenBackbone(net):
        if cache is None:
            cache = extract_cache(net, data.images, data.labels, norm, ics.exits, flip_views=cfg.flip_views,
                                  dtype=np.float16,
                                  progress=(lambda i, n: progress("features", i, n)) if progress else None)
        val_cache = extract_cache(net, val.images, val.labels, norm, ics.exits) if val is not None and len(val) \
            else None
    extract = time.perf_counter() - t0
    result = train_on_cache(ics, cache, cfg, val_cache, progress)
    result.extract_seconds = extract
    return result
