"""Trained early-exit baselines on the same frozen backbone: BranchyNet-style branches and BWDS.

Both train on a :class:`~service.offline.ics.FeatureCache` (one inference pass of the backbone, BatchNorm in
eval mode), with the same Adam optimiser, epoch budget and seed handling as the SDN ICs, and both are
evaluated through :mod:`service.earlyexit.ic_rules` with the same FLOPs accounting (backbone up to the exit
plus every head consulted, 2 FLOPs per multiply-add) and the same selection split.

**BranchyNet** (Teerapittayanon et al. 2016; ``kunglab/branchynet``). B-ResNet-110 has a branch right
after the stem and one after the first third of the residual blocks, each a small conv stack + linear;
the exit rule is softmax entropy below a per-branch threshold (``ic_entropy`` in ``ic_rules``). Here each
branch is max pooling to ``8 x 8``, one ``3 x 3`` convolution (channels doubled) + BatchNorm + ReLU, global
average pooling and a linear layer, attached to the backbone exits nearest to 0 % and 33 % of its FLOPs
(about 0.7 % of the network's FLOPs each on ResNet-20). A full residual block at ``32 x 32`` would cost
12 times more to train and about 9 % of the network per branch; on this shared 2-core CPU it did not fit
the unlimited budget (measured 1.2 s per batch of 128). The pooled branch inputs are cached. BranchyNet
trains backbone and branches jointly with loss weights; the backbone here stays **frozen** (joint training
would change the backbone the class means and the other baselines see, and costs a full backbone epoch
per epoch on this 2-core CPU). With a frozen backbone the final exit's loss is a constant and the branches
share no parameters, so the weights ``(1/6, 1/4, 1)`` only rescale each branch's gradient, which Adam
normalises away (up to its epsilon): they are applied as given and have no practical effect.

**BWDS** (Bolukbasi, Wang, Dekel, Saligrama, ICML 2017, adaptive early exit). At each of the SDN exit
positions a *pooled linear classifier* (average pooling to 4x4 + linear; trained like the ICs) makes the
prediction, and a *decision function* ``g_j`` (a linear layer on ``[pooled feature, sorted softmax of the
classifier]``) says "exit" or "go on". The decision functions are trained one epoch each, deepest exit
first, as weighted binary classification: with the policy downstream fixed, a sample's cost of exiting
at ``j`` is ``err_j + lambda * c_j`` and of going on ``err_down + lambda * c_down`` (``err``: 0/1 error,
``c``: FLOPs fraction), its label is the cheaper action and its weight the absolute difference. Each
``lambda`` of a small grid gives one policy; the exit score ``sigmoid(g_j)`` is then thresholded per exit
like a top probability (0.5 everywhere is the policy itself), and thresholds are searched on the same
selection split as every other method. The decision functions are trained on the IC-training split.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from service.backbones import StageProfile
from service.backbones.internal_classifiers import place_ics, pooling_kernel
from service.earlyexit.cascade_table import CascadeCosts, CascadeTable
from service.earlyexit.ic_rules import ICCosts, ICDecisionTable
from service.offline.ic_cache import FeatureCache
from service.offline.ics import ICTrainConfig, ProgressFn, cache_batches, lr_at, optimiser_step, torch_threads

BRANCH_TARGETS = (0.0, 1.0 / 3.0)
BRANCH_WEIGHTS = (1.0 / 6.0, 1.0 / 4.0, 1.0)
BWDS_LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# ------------------------------------------------------------------------------------------- BranchyNet


BRANCH_GRID = 8


def branch_kernel(shape: Sequence[int], grid: int = BRANCH_GRID) -> int:
    """Max-pooling kernel that brings a ``(C, H, W)`` map to ``grid x grid`` (1 when it is not larger)."""
    h = int(shape[1])
    return h // grid if h > grid else 1


class Branch(nn.Module):
    """``(B, C, H, W)`` -> ``(B, K)``: max pool to 8x8, Conv3x3(C -> 2C) + BN + ReLU, global average pool,
    Linear(2C -> K). ``forward_pooled`` starts after the max pool (what the cache stores)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        self.in_shape = (c, h, w)
        self.kernel = branch_kernel(self.in_shape)
        self.conv = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * c)
        self.linear = nn.Linear(2 * c, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel) if self.kernel > 1 else x

    def forward_pooled(self, p: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn(self.conv(p)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(self.pool(x))

    def flops(self) -> int:
        """Conv and linear as ``FlopCounterMode`` counts them, plus one comparison per input element of the
        max pool and one add per element of the global average pool (BN and ReLU: 0, as everywhere)."""
        was = self.training
        self.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            p = self.pool(torch.zeros(1, *self.in_shape))
            z = self.conv(p)
            self.linear(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))
        self.train(was)
        pool = int(torch.tensor(self.in_shape).prod()) if self.kernel > 1 else 0
        return int(counter.get_total_flops()) + pool + int(z[0].numel())


class BranchSet(nn.Module):
    def __init__(self, exits: Sequence[int], shapes: Sequence[Sequence[int]], num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.exits = tuple(int(e) for e in exits)
        self.branches = nn.ModuleList(Branch(s, num_classes) for s in shapes)

    def flops(self) -> list[int]:
        return [b.flops() for b in self.branches]  # type: ignore[union-attr]


def _rows(a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a[idx])).float()


def place_branches(profile: StageProfile, targets: Sequence[float] = BRANCH_TARGETS) -> tuple[int, ...]:
    return place_ics(profile, targets).exits


@dataclass
class TrainLog:
    history: list[dict[str, Any]]
    seconds: float
    snapshots: dict[int, Any] = field(default_factory=dict)

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([h["seconds"] for h in self.history])) if self.history else 0.0


def train_branches(branches: BranchSet, cache: FeatureCache, cfg: ICTrainConfig,
                   weights: Sequence[float] = BRANCH_WEIGHTS, progress: ProgressFn | None = None) -> TrainLog:
    """Adam on ``sum_b w_b CE(branch_b(map))`` over the cached max-pooled maps at the branch exits (frozen
    backbone; the cache must be built with ``map_grid=BRANCH_GRID``)."""
    with torch_threads(cfg.threads):
        return _train_branches(branches, cache, cfg, weights, progress)


def _train_branches(branches: BranchSet, cache: FeatureCache, cfg: ICTrainConfig, weights: Sequence[float],
                    progress: ProgressFn | None) -> TrainLog:
    missing = [e for e in branches.exits if e not in cache.maps]
    if missing:
        raise ValueError(f"the cache holds no feature maps at branch exits {missing}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(branches.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_view = len(cache) // cache.views
    labels = np.asarray(cache.labels)
    steps = math.ceil(n_view / cfg.batch_size)
    history: list[dict[str, Any]] = []
    snapshots: dict[int, BranchSet] = {}
    t_all = time.perf_counter()
    for epoch in range(cfg.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, epoch)
        branches.train()
        t0 = time.perf_counter()
        loss_sum = 0.0
        for s, idx in cache_batches(rng, n_view, cache.views, epoch, cfg.batch_size):
            y = torch.from_numpy(labels[idx])
            loss = sum(w * F.cross_entropy(b.forward_pooled(_rows(cache.maps[e], idx)), y)
                       for w, b, e in zip(weights, branches.branches, branches.exits, strict=False))
            loss_sum += optimiser_step(opt, loss, len(idx))  # type: ignore[arg-type]
            if progress is not None and s % 50 == 0:
                progress(f"branches epoch {epoch + 1}/{cfg.epochs}", s, steps)
        history.append({"epoch": epoch + 1, "loss": loss_sum / n_view, "lr": lr_at(cfg, epoch),
                        "seconds": time.perf_counter() - t0})
        if epoch + 1 in cfg.snapshot_epochs:
            snapshots[epoch + 1] = copy.deepcopy(branches).eval()
    branches.eval()
    return TrainLog(history, time.perf_counter() - t_all, snapshots)


@torch.inference_mode()
def branch_table(branches: BranchSet, cache: FeatureCache, batch_size: int = 1000) -> ICDecisionTable:
    """Decision table of the branches (read through the ``ic_*`` columns; use mode ``ic_entropy``)."""
    branches.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in branches.branches]
    for lo in range(0, len(cache), batch_size):
        for i, (b, e) in enumerate(zip(branches.branches, branches.exits, strict=True)):
            p = torch.from_numpy(np.asarray(cache.maps[e][lo:lo + batch_size])).float()
            outs[i].append(torch.softmax(b.forward_pooled(p), 1))
    final = torch.softmax(torch.from_numpy(np.asarray(cache.logits)).float(), 1)
    return ICDecisionTable.from_outputs([torch.cat(o) for o in outs], final, torch.from_numpy(np.asarray(cache.labels)))


def branch_costs(profile: StageProfile, branches: BranchSet) -> ICCosts:
    cum = profile.cumulative
    return ICCosts((*(float(cum[e]) for e in branches.exits), float(profile.total)),
                   tuple(float(f) for f in branches.flops()), tuple(0.0 for _ in branches.exits))


# ------------------------------------------------------------------------------------------------- BWDS


class PooledLinear(nn.Module):
    """Average pooling to 4x4 (SDN's kernel) + Linear; reads the cache's average-pooled features."""

    def __init__(self, in_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        self.in_shape = (c, h, w)
        self.kernel = pooling_kernel(self.in_shape)
        self.feature_dim = c * (h // self.kernel) * (w // self.kernel)
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel > 1:
            x = F.avg_pool2d(x, self.kernel)
        return self.linear(torch.flatten(x, 1))

    def flops(self) -> int:
        """Linear ``2 D K`` plus one add per input element when pooled."""
        c, h, w = self.in_shape
        return 2 * self.feature_dim * self.linear.out_features + (c * h * w if self.kernel > 1 else 0)


def policy_input(avg_feature: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``[pooled feature (B, D), softmax sorted descending (B, K)]`` -> ``(B, D + K)``."""
    return torch.cat([avg_feature, probs.sort(1, descending=True).values], 1)


@dataclass
class BWDSModel:
    """``classifiers[i]`` at backbone exit ``exits[i]``; ``policies[lam][i]``: ``Linear(D_i + K -> 1)``."""

    exits: tuple[int, ...]
    classifiers: nn.ModuleList
    policies: dict[float, nn.ModuleList] = field(default_factory=dict)

    def classifier_flops(self) -> list[int]:
        return [c.flops() for c in self.classifiers]  # type: ignore[union-attr]

    def policy_flops(self) -> list[int]:
        """``2 (D + K)`` per decision function (the sort of ``K`` values is not counted)."""
        return [2 * (c.feature_dim + c.linear.out_features) for c in self.classifiers]  # type: ignore[union-attr]


def new_bwds(profile: StageProfile, exits: Sequence[int], num_classes: int, seed: int = 0) -> BWDSModel:
    torch.manual_seed(seed)
    return BWDSModel(tuple(exits), nn.ModuleList(PooledLinear(profile.shapes[e], num_classes) for e in exits))


def train_bwds_classifiers(model: BWDSModel, cache: FeatureCache, cfg: ICTrainConfig,
                           progress: ProgressFn | None = None) -> TrainLog:
    """The pooled linear classifiers: Adam on the summed cross-entropies, like the ICs."""
    with torch_threads(cfg.threads):
        return _train_bwds_classifiers(model, cache, cfg, progress)


def _train_bwds_classifiers(model: BWDSModel, cache: FeatureCache, cfg: ICTrainConfig,
                            progress: ProgressFn | None) -> TrainLog:
    if tuple(cache.exits) != model.exits:
        raise ValueError("cache exits differ from the BWDS exits")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.classifiers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_view = len(cache) // cache.views
    labels = np.asarray(cache.labels)
    pavg = [np.asarray(a) for a in cache.pooled_avg]
    steps = math.ceil(n_view / cfg.batch_size)
    history: list[dict[str, Any]] = []
    snapshots: dict[int, nn.ModuleList] = {}
    t_all = time.perf_counter()
    for epoch in range(cfg.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, epoch)
        model.classifiers.train()
        t0 = time.perf_counter()
        loss_sum = 0.0
        for s, idx in cache_batches(rng, n_view, cache.views, epoch, cfg.batch_size):
            y = torch.from_numpy(labels[idx])
            loss = sum(F.cross_entropy(c.linear(torch.from_numpy(pavg[i][idx]).float()), y)
                       for i, c in enumerate(model.classifiers))
            loss_sum += optimiser_step(opt, loss, len(idx))  # type: ignore[arg-type]
            if progress is not None and s % 50 == 0:
                progress(f"bwds classifiers epoch {epoch + 1}/{cfg.epochs}", s, steps)
        history.append({"epoch": epoch + 1, "loss": loss_sum / n_view, "seconds": time.perf_counter() - t0})
        if epoch + 1 in cfg.snapshot_epochs:
            snapshots[epoch + 1] = copy.deepcopy(model.classifiers).eval()
    model.classifiers.eval()
    return TrainLog(history, time.perf_counter() - t_all, snapshots)


@torch.inference_mode()
def _classifier_outputs(model: BWDSModel, cache: FeatureCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per exit: average-pooled features ``(N, D_i)`` float32 and classifier softmax ``(N, K)``."""
    feats = [torch.from_numpy(np.asarray(a)).float() for a in cache.pooled_avg]
    probs = [torch.softmax(c.linear(f), 1) for c, f in zip(model.classifiers, feats, strict=True)]
    return feats, probs


def train_bwds_policies(model: BWDSModel, cache: FeatureCache, costs: ICCosts,
                        lambdas: Sequence[float] = BWDS_LAMBDAS, lr: float = 1e-3, batch_size: int = 128,
                        seed: int = 0) -> TrainLog:
    """One epoch per decision function, deepest exit first, for every ``lambda`` (see the module docstring).

    ``costs``: the cascade's FLOPs (``ic_cost`` = classifier, ``cm_cost`` = decision function); a sample's
    cost of leaving at exit ``j`` is its cumulative FLOPs fraction with every exit on the way consulted.
    """
    with torch_threads(1):
        return _train_bwds_policies(model, cache, costs, lambdas, lr, batch_size, seed)


def _train_bwds_policies(model: BWDSModel, cache: FeatureCache, costs: ICCosts, lambdas: Sequence[float],
                         lr: float, batch_size: int, seed: int) -> TrainLog:
    t_all = time.perf_counter()
    feats, probs = _classifier_outputs(model, cache)
    labels = torch.from_numpy(np.asarray(cache.labels))
    final_correct = torch.from_numpy(np.asarray(cache.logits)).argmax(1) == labels
    correct = torch.stack([*(p.argmax(1) == labels for p in probs), final_correct], 1).double()  # (N, E+1)
    e_count = len(model.exits)
    per = [costs.ic_cost[j] + costs.cm_cost[j] for j in range(e_count)]
    cum = np.cumsum(per)
    frac = torch.tensor([(costs.backbone_cum[j] + cum[j]) / costs.full for j in range(e_count)]
                        + [(costs.backbone_cum[-1] + cum[-1]) / costs.full], dtype=torch.float64)
    n = labels.shape[0]
    history: list[dict[str, Any]] = []
    inputs = [policy_input(f, p) for f, p in zip(feats, probs, strict=True)]
    for lam in lambdas:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        pols = nn.ModuleList(nn.Linear(x.shape[1], 1) for x in inputs)
        exit_at = torch.full((n,), e_count, dtype=torch.int64)
        for j in range(e_count - 1, -1, -1):
            rows = torch.arange(n)
            c_exit = (1.0 - correct[:, j]) + lam * frac[j]
            c_down = (1.0 - correct[rows, exit_at]) + lam * frac[exit_at]
            target = (c_exit < c_down).float()
            weight = (c_exit - c_down).abs().float()
            weight = weight / weight.mean().clamp_min(1e-12)
            pol = pols[j]
            opt = torch.optim.Adam(pol.parameters(), lr=lr)
            perm = torch.randperm(n, generator=gen)
            loss_sum = 0.0
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                logit = pol(inputs[j][idx]).squeeze(1)
                loss = F.binary_cross_entropy_with_logits(logit, target[idx], weight=weight[idx])
                loss_sum += optimiser_step(opt, loss, len(idx))
            with torch.no_grad():
                leave = pol(inputs[j]).squeeze(1) > 0.0
            exit_at = torch.where(leave, torch.full_like(exit_at, j), exit_at)
            history.append({"lambda": lam, "exit": j, "loss": loss_sum / n, "exit_share_train": float(leave.double()
                                                                                                   .mean()),
                            "positive_share": float(target.mean())})
        model.policies[lam] = pols.eval()
    return TrainLog(history, time.perf_counter() - t_all)


def bwds_costs(profile: StageProfile, model: BWDSModel) -> ICCosts:
    """``ic_cost``: classifier; ``cm_cost``: decision function (both paid at every enabled exit)."""
    cum = profile.cumulative
    return ICCosts((*(float(cum[e]) for e in model.exits), float(profile.total)),
                   tuple(float(f) for f in model.classifier_flops()), tuple(float(f) for f in model.policy_flops()))


def bwds_cascade_costs(costs: ICCosts) -> CascadeCosts:
    """Classifier and decision function both paid when the exit is enabled."""
    return CascadeCosts(costs.backbone_cum, tuple(a + b for a, b in zip(costs.ic_cost, costs.cm_cost, strict=True)),
                        (tuple(0.0 for _ in costs.ic_cost),))


@torch.inference_mode()
def bwds_tables(model: BWDSModel, cache: FeatureCache) -> dict[float, CascadeTable]:
    """One cascade per ``lambda``: score ``sigmoid(g_j)`` (fires when ``> T_j``, ``T >= 1`` disables),
    prediction = the pooled linear classifier, the network's own at the end."""
    feats, probs = _classifier_outputs(model, cache)
    labels = torch.from_numpy(np.asarray(cache.labels))
    pred = torch.stack([*(p.argmax(1) for p in probs), torch.from_numpy(np.asarray(cache.logits)).argmax(1)], 1)
    out = {}
    for lam, pols in model.policies.items():
        scores = torch.stack([torch.sigmoid(pol(policy_input(f, p)).squeeze(1))
                              for pol, f, p in zip(pols, feats, probs, strict=True)], 1)
        out[lam] = CascadeTable(scores.unsqueeze(1).float(), (1.0,), pred, labels)
    return out
