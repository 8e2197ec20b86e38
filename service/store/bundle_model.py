"""A loaded class-mean bundle: one ``ExitHead`` per early exit, the FLOPs table and the profiles.

Converts to and from the on-disk ``BundleFiles`` and validates everything on the way in (shapes,
dtypes, finiteness, the weights it was calibrated on), so a corrupt bundle is refused with a clear
``BundleError`` instead of failing deep inside torch at the first request.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.earlyexit import ExitCosts, ExitHead, Profile
from service.earlyexit.exit_head import METRICS
from service.earlyexit.reduction import reduced_dim
from service.store.bundles import BundleError, BundleFiles, read_bundle, write_bundle
from service.store.model_dir import ModelSpec, check_provenance
from service.store.timing import read_timing

log = logging.getLogger("classmeans.store")

FORMAT_VERSION = 1


@dataclass
class Bundle:
    bundle_id: str
    heads: dict[int, ExitHead]
    costs: ExitCosts
    exit_names: list[str]
    exit_shapes: list[tuple[int, ...]]
    profiles: list[Profile]
    default_profile: str
    config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] | None = None  # timing.json (service/store/timing.py): the measured time axis, if any

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    def profile_names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def to_files(self, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        exits = []
        for j, name in enumerate(self.exit_names):
            entry: dict[str, Any] = {"index": j, "name": name, "shape": list(self.exit_shapes[j]),
                                     "backbone_flops_cum": float(self.costs.backbone_cum[j])}
            if j < self.num_exits - 1:
                entry["head_flops"] = float(self.costs.head_cost[j])
                head = self.heads.get(j)
                if head is not None:
                    tensors.update(head.tensors(f"exit{j}"))
                    entry.update({"reduction": head.reduction, "metric": head.metric,
                                  "temperature": head.temperature, "dim": int(head.means.shape[1])})
            exits.append(entry)
        meta = {"format": FORMAT_VERSION, "model": spec.name, "weights_sha256": spec.weights_sha256,
                "classes": list(spec.classes), "flops_full": self.costs.full,
                "flops_unit": "FLOPs, 2 per multiply-add (torch.utils.flop_counter)",
                "exits": exits, "config": self.config, **self.meta}
        if self.costs.skips:
            meta["skips"] = [[int(a), int(b), float(c)] for a, b, c in self.costs.skips]
        profiles = {"default": self.default_profile, "profiles": [p.to_json() for p in self.profiles]}
        return meta, tensors, profiles

    def save(self, model_dir: Path, spec: ModelSpec, extra_files: dict[str, bytes] | None = None) -> Path:
        meta, tensors, profiles = self.to_files(spec)
        return write_bundle(model_dir, self.bundle_id, meta, tensors, profiles, extra_files)


def _finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise BundleError(f"{what} must be float32, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise BundleError(f"{what} has non-finite values")
    return t


def bundle_from_files(files: BundleFiles, spec: ModelSpec, num_exits: int | None = None) -> Bundle:
    """Validate raw bundle files against the model and build the runtime object."""
    meta, tensors = files.meta, files.tensors
    bid = files.bundle_id
    try:
        if meta.get("format") != FORMAT_VERSION:
            raise BundleError(f"bundle {bid}: unsupported format {meta.get('format')!r}")
        check_provenance(meta, spec, f"bundle {bid}", "calibrated", BundleError, "bundle_model_mismatch")
        exits = meta["exits"]
        m = len(exits)
        if num_exits is not None and m != num_exits:
            raise BundleError(f"bundle {bid}: {m} exits, the backbone has {num_exits}",
                              code="bundle_model_mismatch")
        k = spec.num_classes
        heads: dict[int, ExitHead] = {}
        backbone_cum, head_cost, names, shapes = [], [], [], []
        for j, e in enumerate(exits):
            if int(e["index"]) != j:
                raise BundleError(f"bundle {bid}: exits out of order at {j}")
            names.append(str(e["name"]))
            shapes.append(tuple(int(v) for v in e["shape"]))
            backbone_cum.append(float(e["backbone_flops_cum"]))
            if j == m - 1:
                continue
            head_cost.append(float(e["head_flops"]))
            if f"exit{j}.means" not in tensors:
                continue
            heads[j] = _head(bid, j, e, tensors, shapes[j], k)
        skips = tuple((int(a), int(b), float(c)) for a, b, c in meta.get("skips", []))
        costs = ExitCosts(tuple(backbone_cum), tuple(head_cost), skips)
        profiles = [Profile.from_json(p) for p in files.profiles["profiles"]]
        if not profiles:
            raise BundleError(f"bundle {bid} has no profiles")
        handovers = {last for _, last, _ in skips}  # a cascade member's classifier: its softmax decides
        for p in profiles:
            if len(p.thresholds) != m - 1:
                raise BundleError(f"bundle {bid}: profile {p.name} has {len(p.thresholds)} thresholds")
            for j, t in enumerate(p.thresholds):
                if t < 1.0 and j not in heads and j not in handovers:
                    raise BundleError(f"bundle {bid}: profile {p.name} enables exit {j}, which has no means")
        default = str(files.profiles.get("default", profiles[-1].name))
        if default not in {p.name for p in profiles}:
            raise BundleError(f"bundle {bid}: default profile {default!r} is not listed")
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BundleError(f"bundle {bid} is malformed: {exc!r}") from exc
    return Bundle(bid, heads, costs, names, shapes, profiles, default, dict(meta.get("config", {})),
                  meta=dict(meta))


def _head(bid: str, j: int, e: dict[str, Any], tensors: dict[str, torch.Tensor], shape: tuple[int, ...], k: int
          ) -> ExitHead:
    """Exit ``j``'s class-means head from its ``bundle.json`` entry and tensors, validated."""
    metric = str(e["metric"])
    if metric not in METRICS:
        raise BundleError(f"bundle {bid}: exit {j} has unknown metric {metric!r}")
    means = _finite(tensors[f"exit{j}.means"], f"exit {j} means")
    norm = _finite(tensors[f"exit{j}.normaliser"], f"exit {j} normaliser")
    scale = tensors.get(f"exit{j}.scale")
    proj = tensors.get(f"exit{j}.projection")
    d = reduced_dim(shape, str(e["reduction"]))
    p = proj.shape[1] if proj is not None else d
    if means.shape != (k, p) or norm.shape != (k,) or bool((norm <= 0).any()):
        raise BundleError(f"bundle {bid}: exit {j} means/normaliser have wrong shape or sign")
    if scale is not None and _finite(scale, f"exit {j} scale").shape != (d,):
        raise BundleError(f"bundle {bid}: exit {j} scale must be ({d},)")
    if proj is not None and _finite(proj, f"exit {j} projection").shape != (d, p):
        raise BundleError(f"bundle {bid}: exit {j} projection must be ({d}, {p})")
    temp = float(e.get("temperature", 1.0))
    if not math.isfinite(temp) or temp <= 0:
        raise BundleError(f"bundle {bid}: exit {j} temperature must be > 0")
    return ExitHead(str(e["reduction"]), metric, means, norm, scale, proj, temp)


def load_bundle(model_dir: Path, bundle_id: str, spec: ModelSpec, num_exits: int | None = None) -> Bundle:
    """The bundle, checked, with its measured time axis when ``timing.json`` is there and readable (a damaged
    timing file is logged and ignored: the bundle serves in FLOPs only)."""
    bundle = bundle_from_files(read_bundle(model_dir, bundle_id), spec, num_exits)
    try:
        bundle.timing = read_timing(model_dir, bundle_id)
    except BundleError as exc:
        log.error("bundle %s: %s; serving without its time axis", bundle_id, exc)
    return bundle
