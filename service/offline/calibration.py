"""Calibrate a bundle: class means on one split, thresholds chosen on another, all streamed.

Pass 1 (means split): per-class sums (and second moments for the metric) at every exit (Eq. 2).
Pass 2 (means split): distances to the means -> normalisers ``n_j^k`` (Eq. 4); (selection split):
distances kept as an ``N x M x K`` array, normalised once pass 2 ends, turned into the decision table.
Then the threshold search and the upper hull give the profiles. Several head variants (reduction,
metric, temperature) share the same forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from service.backbones import StagedNetwork, StageProfile, profile_stages
from service.backbones.preprocess import Normalizer
from service.earlyexit import (
    ClassStatsAccumulator,
    DecisionTable,
    ExitCosts,
    ExitHead,
    NormaliserAccumulator,
    Profile,
    fit_exit_head,
    reduce_feature,
    reduced_dim,
    search_thresholds,
)
from service.earlyexit.exit_head import MOMENTS_FOR_METRIC
from service.earlyexit.probabilities import class_probabilities
from service.earlyexit.search import SearchResult
from service.ingest.labelled import LabelledImages
from service.offline.distributed import DataParallel
from service.offline.features import iter_shard_features
from service.store.bundle_model import Bundle

StatusFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class HeadConfig:
    """How every early exit compares features with class means."""

    reduction: str = "full"
    metric: str = "euclidean"
    temperature: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.reduction}/{self.metric}/T{self.temperature:g}"


@dataclass
class CalibrationConfig:
    heads: list[HeadConfig] = field(default_factory=lambda: [HeadConfig()])
    search: str = "paper"
    samples: int = 10_000
    seed: int = 0
    batch_size: int = 250
    exits: list[int] | None = None  # early exits that get means (default: all)
    selection: str = "holdout"  # "holdout" (ours) or "means" (the paper: choose on the means data)
    tolerance: float = 0.005  # the default profile: cheapest within this of the full network


@dataclass
class VariantResult:
    head_config: HeadConfig
    heads: dict[int, ExitHead]
    table: DecisionTable
    search: SearchResult
    profiles: list[Profile]
    default_profile: str


@dataclass
class CalibrationResult:
    stage_profile: StageProfile
    exit_names: list[str]
    variants: list[VariantResult]
    timings: dict[str, float]
    num_means: int
    num_selection: int

    def costs(self, variant: VariantResult) -> ExitCosts:
        return exit_costs(self.stage_profile, variant.heads)

    def bundle(self, variant: VariantResult, bundle_id: str, config: CalibrationConfig,
               report: dict[str, Any] | None = None) -> Bundle:
        cfg = {**asdict(config), "heads": [asdict(variant.head_config)],
               "num_means": self.num_means, "num_selection": self.num_selection}
        return Bundle(bundle_id, variant.heads, self.costs(variant), self.exit_names,
                      list(self.stage_profile.shapes), variant.profiles, variant.default_profile,
                      config=cfg, report=report or {})


def exit_costs(stage_profile: StageProfile, heads: dict[int, ExitHead]) -> ExitCosts:
    shapes = stage_profile.shapes
    head_cost = tuple(float(heads[j].flops(shapes[j])) if j in heads else 0.0
                      for j in range(len(shapes) - 1))
    return ExitCosts(tuple(float(c) for c in stage_profile.cumulative), head_cost)


def profiles_from_search(result: SearchResult, costs: ExitCosts, tolerance: float) -> tuple[list[Profile], str]:
    """Hull vertices -> named profiles (``hull-00`` cheapest ...), plus ``full`` (never exit early)."""
    full = costs.full
    profiles: list[Profile] = []
    full_idx = 0  # search_thresholds puts the all-disabled vector first
    full_acc = float(result.accuracy[full_idx])
    for i, idx in enumerate(result.hull):
        if idx == full_idx or bool((result.thresholds[idx] >= 1).all()):
            continue
        profiles.append(Profile(f"hull-{i:02d}", result.thresholds[idx].tolist(), float(result.flops[idx]),
                                float(result.flops[idx]) / full, float(result.accuracy[idx])))
    profiles.append(Profile("full", [1.0] * result.thresholds.shape[1], full, 1.0, full_acc,
                            extra={"on_hull": full_idx in result.hull}))
    ok = [p for p in profiles if p.accuracy >= full_acc - tolerance]
    default = min(ok, key=lambda p: p.flops).name
    return profiles, default


def _accumulate_means(net: StagedNetwork, data: LabelledImages, norm: Normalizer, cfg: CalibrationConfig,
                      exits: list[int], shapes: list[tuple[int, ...]], classes: list[str],
                      status: StatusFn | None, dp: DataParallel | None = None,
                      ) -> dict[tuple[str, str], dict[int, ClassStatsAccumulator]]:
    moments_needed: dict[str, str] = {}
    order = ["none", "diag", "full"]
    for h in cfg.heads:
        need = MOMENTS_FOR_METRIC[h.metric]
        moments_needed[h.reduction] = max(moments_needed.get(h.reduction, "none"), need, key=order.index)
    # One accumulator per (reduction, exit) carrying the largest second moment any metric needs.
    accs: dict[str, dict[int, ClassStatsAccumulator]] = {
        r: {j: ClassStatsAccumulator(len(classes), reduced_dim(shapes[j], r), m, exit_name=str(j)) for j in exits}
        for r, m in moments_needed.items()}
    rank, world = (dp.rank, dp.world) if dp else (0, 1)
    for _, feats, _, labels in iter_shard_features(net, data.images, data.labels, norm, cfg.batch_size, rank, world,
                                                   progress=(lambda i, n: status("means", i, n)) if status else None):
        for r, per_exit in accs.items():
            for j, acc in per_exit.items():
                acc.update(reduce_feature(feats[j], r), labels)
    for per_exit in accs.values():
        for acc in per_exit.values():
            if dp is not None:
                _all_reduce_stats(acc, dp)
            acc.check_complete(classes)
    return {(h.reduction, h.metric): accs[h.reduction] for h in cfg.heads}


def _all_reduce_stats(acc: ClassStatsAccumulator, dp: DataParallel) -> None:
    """Sum an exit's float64 class sums (and second moments) and its counts over all processes."""
    for t in (acc.sums, acc.counts, acc.sq, acc.xtx):
        if t is not None:
            dp.sum_(t)


def calibrate(net: StagedNetwork, classes: list[str], norm: Normalizer, means_set: LabelledImages,
              selection_set: LabelledImages | None, cfg: CalibrationConfig,
              status: StatusFn | None = None, dp: DataParallel | None = None) -> CalibrationResult:
    """Run the whole calibration; ``selection_set`` None means choose on the means data (paper mode).

    ``dp``: run data-parallel (every process calls this with the same arguments and data); each process
    computes its share of the batches, the statistics are all-reduced, and every process returns the same
    result as one process would.
    """
    net.eval()
    stage_profile = profile_stages(net)
    shapes = list(stage_profile.shapes)
    m = net.num_exits
    exits = sorted(cfg.exits) if cfg.exits is not None else list(range(m - 1))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = _accumulate_means(net, means_set, norm, cfg, exits, shapes, classes, status, dp)
    timings["pass1_means_seconds"] = time.perf_counter() - t0

    heads_by_variant: list[dict[int, ExitHead]] = []
    for h in cfg.heads:
        per_exit = stats[(h.reduction, h.metric)]
        heads_by_variant.append({j: fit_exit_head(per_exit[j], h.reduction, h.metric, h.temperature)
                                 for j in exits})

    t0 = time.perf_counter()
    sel = selection_set if selection_set is not None and len(selection_set) else means_set
    norms, sel_dist, final = _second_pass(net, norm, means_set, sel, cfg, heads_by_variant, len(classes), status,
                                          dp)
    timings["pass2_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants = _search_variants(cfg, stage_profile, heads_by_variant, norms, sel_dist, final, sel, m)
    timings["search_seconds"] = time.perf_counter() - t0
    return CalibrationResult(stage_profile, list(net.exit_names), variants, timings, len(means_set),
                             len(sel))


def _second_pass(net: StagedNetwork, norm: Normalizer, means_set: LabelledImages, sel: LabelledImages,
                 cfg: CalibrationConfig, heads_by_variant: list[dict[int, ExitHead]], k: int,
                 status: StatusFn | None, dp: DataParallel | None = None
                 ) -> tuple[list[dict[int, NormaliserAccumulator]], list[torch.Tensor],
                                                   tuple[torch.Tensor, torch.Tensor]]:
    """Pass 2: normalisers over the means data, distances on the selection data (the same pass when they
    are the same set). Returns (normaliser accumulators per variant and exit, selection distances per
    variant ``(N, M-1, K)``, the network's own (top probability, prediction) on the selection data)."""
    m = net.num_exits
    norms = [{j: NormaliserAccumulator(k) for j in heads} for heads in heads_by_variant]
    same = sel is means_set
    sel_dist = [torch.zeros(len(sel), m - 1, k) for _ in heads_by_variant]
    final_top = torch.zeros(len(sel))
    final_pred = torch.zeros(len(sel), dtype=torch.int64)

    def record(dst: int, feats: list[torch.Tensor], logits: torch.Tensor, lo: int, hi: int) -> None:
        for v, heads in enumerate(heads_by_variant):
            for j, head in heads.items():
                d = head.distances(feats[j])
                if dst & 1:
                    norms[v][j].update(d)
                if dst & 2:
                    sel_dist[v][lo:hi, j] = d
        if dst & 2:
            c, p = torch.softmax(logits.float(), 1).max(1)
            final_top[lo:hi], final_pred[lo:hi] = c, p

    rank, world = (dp.rank, dp.world) if dp else (0, 1)
    passes = [(means_set, "normalisers", 1 | (2 if same else 0))] + ([] if same else [(sel, "selection", 2)])
    for data, stage, dst in passes:
        for lo, feats, logits, _ in iter_shard_features(net, data.images, data.labels, norm, cfg.batch_size,
                                                        rank, world, progress=(lambda i, n, s_=stage: status(s_, i, n))
                                                        if status else None):
            record(dst, feats, logits, lo, lo + logits.shape[0])
    if dp is not None:  # every selection row was written by exactly one process, zeros elsewhere
        for v in range(len(heads_by_variant)):
            dp.sum_(sel_dist[v])
            for acc in norms[v].values():
                dp.sum_(acc.sums)
                acc.count = dp.sum_int(acc.count)
        dp.sum_(final_top)
        dp.sum_(final_pred)
    return norms, sel_dist, (final_top, final_pred)


def _search_variants(cfg: CalibrationConfig, stage_profile: StageProfile, heads_by_variant: list[dict[int, ExitHead]],
                     norms: list[dict[int, NormaliserAccumulator]], sel_dist: list[torch.Tensor],
                     final: tuple[torch.Tensor, torch.Tensor], sel: LabelledImages, m: int) -> list[VariantResult]:
    """Per head variant: fill the normalisers, build the decision table, search thresholds, pick profiles."""
    variants = []
    labels = torch.from_numpy(sel.labels)
    for v, (h, heads) in enumerate(zip(cfg.heads, heads_by_variant, strict=True)):
        top = torch.zeros(len(sel), m)
        pred = torch.zeros(len(sel), m, dtype=torch.int64)
        for j, head in heads.items():
            head.normaliser = norms[v][j].value().to(torch.float32)
            p = class_probabilities(sel_dist[v][:, j], head.normaliser, head.temperature)
            top[:, j], pred[:, j] = p.max(1)
        top[:, m - 1], pred[:, m - 1] = final
        table = DecisionTable(top, pred, labels)
        costs = exit_costs(stage_profile, heads)
        result = search_thresholds(restrict_to_heads(table, heads, m), costs, cfg.search, cfg.samples, cfg.seed)
        missing = [j for j in range(m - 1) if j not in heads]
        result.thresholds[:, missing] = 1.0  # they never fire and cost nothing: say so in the profile
        profiles, default = profiles_from_search(result, costs, cfg.tolerance)
        variants.append(VariantResult(h, heads, table, result, profiles, default))
    return variants


def restrict_to_heads(table: DecisionTable, heads: dict[int, ExitHead], m: int) -> DecisionTable:
    """Exits without means can never fire: give them top probability 0 (any threshold keeps them shut)."""
    missing = [j for j in range(m - 1) if j not in heads]
    if not missing:
        return table
    top = table.top_prob.clone()
    top[:, missing] = 0.0
    return DecisionTable(top, table.pred, table.labels)
