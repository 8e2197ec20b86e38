"""Train internal classifiers for a model and store them with every decision mode's profiles, searched on a
held-out split: the operation ``classmeans train-ics`` runs (and any HTTP route would)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from service.backbones import StagedNetwork, StageProfile
from service.backbones.internal_classifiers import ICSet
from service.backbones.preprocess import Normalizer
from service.earlyexit.cascade_search import CascadeSearch, combined_seeds, search_mode
from service.earlyexit.ic_rules import ICCosts, ICDecisionTable
from service.earlyexit.modes import CM_HEAD, IC_HEAD, DecisionMode, get_mode, mode_names, search_order
from service.ingest.labelled import LabelledImages
from service.offline.ic_cache import extract_cache
from service.offline.ics import FrozenBackbone, ICTrainConfig, ProgressFn, ic_table_from_cache, train_ics
from service.store.bundle_model import Bundle
from service.store.bundles import BundleError
from service.store.ic_sets import ic_costs, save_ics

# ------------------------------------------------------------------------------------- costs and profiles


def search_profiles(table: ICDecisionTable, costs: ICCosts, modes: Sequence[str] | None = None,
                    samples: int = 10_000, seed: int = 0, refine_rounds: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Hull profiles per decision mode (default: every mode of the table) on a selection table. A mode with
    seeds (``combined``: the SDN and class-means hulls) is seeded with their hulls.

    Each profile: ``name`` (``<mode>-NN``, cheapest first, or ``full``), ``mode``, ``thresholds`` (a list,
    or ``{"ic": [...], "cm": [...]}`` for ``combined``), mean ``flops``, ``flops_fraction``, ``accuracy``.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    found = {}
    for mode in search_order(mode_names() if modes is None else modes):
        dm = get_mode(mode)
        if dm.needs_cm and not table.has_cm:
            continue
        extra = _seeds(dm, found, table.num_exits - 1) if dm.seeds else None
        res = search_mode(table, costs, mode, samples, seed, refine_rounds, extra)
        found[mode] = res
        out[mode] = profiles_of(res, costs.full)
    return out


def _seeds(dm: DecisionMode, found: dict[str, CascadeSearch], num_early: int) -> torch.Tensor:
    """User-space seed candidates of a two-criterion mode from its seeding modes' hulls (each seeding mode's
    thresholds in the row of the same head, the other row off: :func:`combined_seeds`)."""
    hulls = {get_mode(s).predictor: found[s].thresholds[found[s].hull] if s in found else None for s in dm.seeds}
    return combined_seeds(hulls.get(IC_HEAD), hulls.get(CM_HEAD), num_early)


def profiles_of(res: CascadeSearch, full_flops: float) -> list[dict[str, Any]]:
    dm = get_mode(res.mode)
    profiles = []
    for i, idx in enumerate(res.hull):
        t = res.thresholds[idx]
        thr: Any = dm.thresholds_json(t)
        f, a = float(res.flops[idx]), float(res.accuracy[idx])
        name = "full" if idx == 0 else f"{res.mode}-{i:02d}"
        profiles.append({"name": name, "mode": res.mode, "thresholds": thr, "flops": f,
                         "flops_fraction": f / full_flops, "accuracy": a})
    if not any(p["name"] == "full" for p in profiles):
        t = res.thresholds[0]
        thr = dm.thresholds_json(t)
        profiles.append({"name": "full", "mode": res.mode, "thresholds": thr, "flops": float(res.flops[0]),
                         "flops_fraction": float(res.flops[0]) / full_flops, "accuracy": float(res.accuracy[0]),
                         "on_hull": False})
    return profiles



def train_config_json(cfg: ICTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["optimizer"] = "Adam"
    return d


# ------------------------------------------------------------------------------- the whole operation


def train_ics_for_model(model_dir: Path, data: LabelledImages, cfg: ICTrainConfig, holdout: int = 5000,
                        bundle_id: str | None = None, samples: int = 10_000, search: bool = True,
                        progress: ProgressFn | None = None, tag: str = "") -> dict[str, Any]:
    """Train ICs for the model in ``model_dir`` and store them; shared by the CLI (and any HTTP route).

    ``holdout`` samples (stratified, seed ``cfg.seed``: the split ``classmeans calibrate`` uses) are kept out
    of training; thresholds for every decision mode are searched on them (``cm``/``combined`` with the class
    means of ``bundle_id``, or the active bundle, when there is one). Returns a JSON-able summary.
    """
    from service.store.active import resolve_bundle
    from service.store.model_dir import load_model

    spec, net = load_model(model_dir)
    data = data.remap_to(spec.classes)
    train_set, selection = data.split_holdout(int(holdout), seed=cfg.seed)
    norm = Normalizer(spec.mean, spec.std)
    stage_profile = profile_from(net)
    bundle = None
    try:
        bundle = resolve_bundle(model_dir, spec, net.num_exits, bundle_id)
    except BundleError:
        if bundle_id is not None:
            raise
    result = train_ics(net, stage_profile, train_set, norm, cfg, progress=progress)
    summary: dict[str, Any] = {
        "model": spec.name, "epochs": cfg.epochs, "train_samples": len(train_set),
        "selection_samples": len(selection), "exits": list(result.ics.exits),
        "exit_names": [net.exit_names[e] for e in result.ics.exits],
        "ic_flops": result.ics.flops(),
        "backbone_flops_fraction": [stage_profile.cumulative[e] / stage_profile.total for e in result.ics.exits],
        "feature_pass_seconds": round(result.extract_seconds, 2),
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "train_seconds": round(result.seconds, 2), "final_loss": result.history[-1]["loss"] if result.history
        else None, "bundle": bundle.bundle_id if bundle else None,
    }
    profiles = _heldout(net, norm, selection, result.ics, stage_profile, bundle, cfg, samples, search, summary) \
        if len(selection) else None
    info = {"training": {**train_config_json(cfg), "history": result.history,
                         "seconds_per_epoch": result.seconds_per_epoch, "feature_pass_seconds": result.extract_seconds},
            "holdout": len(selection), "bundle": summary["bundle"],
            **({"heldout_ic_accuracy": summary["heldout_ic_accuracy"]} if "heldout_ic_accuracy" in summary else {})}
    ics_id, path = save_ics(model_dir, spec, result.ics, stage_profile, info, profiles, tag)
    summary["ics_id"], summary["path"] = ics_id, str(path)
    return summary


def _heldout(net: StagedNetwork, norm: Normalizer, selection: LabelledImages, ics: ICSet, stage_profile: StageProfile,
             bundle: Bundle | None, cfg: ICTrainConfig, samples: int, search: bool, summary: dict[str, Any]
             ) -> dict[str, Any] | None:
    """Accuracy on the held-out split (into ``summary``) and, with ``search``, every mode's profiles."""
    with FrozenBackbone(net):
        sel_cache = extract_cache(net, selection.images, selection.labels, norm, ics.exits,
                                  cm_heads=bundle.heads if bundle else None)
    table = ic_table_from_cache(ics, sel_cache)
    acc = table.per_exit_accuracy()
    summary["heldout_ic_accuracy"] = acc["ic"][:-1]
    summary["heldout_full_accuracy"] = acc["ic"][-1]
    if CM_HEAD in acc:
        summary["heldout_cm_accuracy"] = acc[CM_HEAD]
    if not search:
        return None
    costs = ic_costs(stage_profile, ics, bundle.heads if bundle else None)
    modes = search_profiles(table, costs, samples=samples, seed=cfg.seed)
    summary["profiles"] = {m: len(ps) for m, ps in modes.items()}
    summary["cheapest_within_0.5_points"] = {
        m: _cheapest_within(ps, summary["heldout_full_accuracy"], 0.005) for m, ps in modes.items()}
    return {"bundle": bundle.bundle_id if bundle else None, "selection_samples": len(selection),
            "flops_full": costs.full, "modes": modes}


def _cheapest_within(profiles: list[dict[str, Any]], full_acc: float, points: float) -> dict[str, Any] | None:
    ok = [p for p in profiles if p["accuracy"] >= full_acc - points]
    if not ok:
        return None
    p = min(ok, key=lambda q: q["flops"])
    return {"name": p["name"], "accuracy": p["accuracy"], "flops_fraction": p["flops_fraction"]}


def profile_from(net: StagedNetwork) -> StageProfile:
    from service.backbones import profile_stages

    return profile_stages(net)
