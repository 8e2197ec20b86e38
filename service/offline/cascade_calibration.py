"""Calibrate a cascade of networks: each member's class means as for one model, one search over the sequence.

Per member (one pass each over the means split, one over the selection split): class means and normalisers
at every early exit (:func:`~service.offline.calibration.calibrate`), and the member's decision table on the
selection split (class-means top probability per early exit, its own softmax at its classifier). The tables
are joined into the cascade's sequence (:mod:`service.earlyexit.model_cascade`), the thresholds searched on it
(the member's classifier is one more exit of the sequence, so the search decides where a member hands over),
and the hull becomes the cascade bundle's profiles: a normal bundle whose exits are the sequence's, stored in
the cascade's directory. Honest selection: the split must be disjoint from every member's training data.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from service.backbones.cascade_network import CascadeNetwork
from service.earlyexit import DecisionTable, search_thresholds
from service.earlyexit.model_cascade import join_costs, join_tables
from service.ingest.labelled import LabelledImages
from service.offline.calibration import (
    CalibrationConfig,
    StatusFn,
    calibrate,
    profiles_from_search,
    restrict_to_heads,
)
from service.offline.estimates import SelectionOverlapError, overlap_message, provenance
from service.offline.evaluation import heads_decision_table, plot_curves
from service.offline.operations import _separate_selection, _split_for_selection
from service.store.active import activate_bundle
from service.store.bundle_model import Bundle
from service.store.bundles import new_bundle_id
from service.store.model_dir import ModelSpec, load_model


def cascade_table(net: CascadeNetwork, bundle: Bundle, data: LabelledImages, batch_size: int = 250,
                  progress=None) -> DecisionTable:
    """The cascade bundle's decision table on ``data`` (every member run on every sample)."""
    tables = []
    for i, m in enumerate(net.members):
        tables.append(heads_decision_table(m.net, net.member_heads(bundle.heads, i), data, m.normalizer, batch_size,
                                           progress))
    return join_tables(tables)


def calibrate_cascade(model_dir: Path, data: LabelledImages, cfg: CalibrationConfig, holdout: int | float = 5000,
                      activate: bool = True, status: StatusFn | None = None, tag: str = "",
                      loaded: tuple[ModelSpec, CascadeNetwork] | None = None, source: str | None = None,
                      on_overlap: str = "label", select_on: LabelledImages | None = None,
                      select_source: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """Calibrate the cascade at ``model_dir`` into one bundle (the first head variant of ``cfg``) and activate
    it; arguments as :func:`~service.offline.operations.calibrate_model`. Returns ``([bundle id], summary)``."""
    spec, net = loaded or load_model(model_dir)  # type: ignore[assignment]
    assert isinstance(net, CascadeNetwork)
    data = data.remap_to(spec.classes)
    if select_on is not None:
        means_set, selection, split = _separate_selection(data, select_on.remap_to(spec.classes), cfg, select_source)
    else:
        means_set, selection, split = _split_for_selection(data, cfg, holdout, source)
    records = {r["name"]: r for r in spec.extra.get("members", [])}
    estimates = {m.name: provenance(records.get(m.name, {}).get("training_data"), split) for m in net.members}
    overlapping = [n for n, e in estimates.items() if e["overlaps_training"]]
    if overlapping and on_overlap == "refuse":
        name = overlapping[0]
        raise SelectionOverlapError(f"member {name}: "
                                    + overlap_message(records[name]["training_data"], split))
    t0 = time.perf_counter()
    one = replace(cfg, heads=cfg.heads[:1], exits=None)
    members, tables, costs, shapes, heads = [], [], [], [], {}
    for i, (off, m) in enumerate(zip(net.offsets, net.members, strict=True)):
        member_status = (lambda stage, k, n, i_=i: status(f"member {i_ + 1}/{net.num_members} {stage}", k, n)
                         ) if status else None
        result = calibrate(m.net, spec.classes, m.normalizer, means_set, selection, one, member_status)
        v = result.variants[0]
        members.append({"name": m.name, "num_exits": m.num_exits,
                        "full_accuracy": next(p.accuracy for p in v.profiles if p.name == "full"),
                        "flops_full": result.costs(v).full,
                        "hull": [{"name": p.name, "flops": p.flops, "accuracy": p.accuracy} for p in v.profiles]})
        tables.append(restrict_to_heads(v.table, v.heads, m.num_exits))
        costs.append(result.costs(v))
        shapes.extend(result.stage_profile.shapes)
        heads.update({off + j: h for j, h in v.heads.items()})
    table = join_tables(tables)
    joined = join_costs(costs)
    search = search_thresholds(table, joined, cfg.search, cfg.samples, cfg.seed)
    m1 = net.num_exits - 1
    missing = [j for j in range(m1) if j not in heads and j not in _boundaries(net)]
    search.thresholds[:, missing] = 1.0
    profiles, default = profiles_from_search(search, joined, cfg.tolerance)
    profiles = [p for p in profiles if p.name == "full" or p.flops <= joined.full]  # costlier than the last alone
    if default not in {p.name for p in profiles}:
        default = "full"
    seconds = time.perf_counter() - t0
    bid = new_bundle_id(tag or "cascade")
    full = next(p for p in profiles if p.name == "full")
    dflt = next(p for p in profiles if p.name == default)
    report = {"kind": "cascade", "members": members, "selection_samples": table.num_samples,
              "full_network_accuracy": full.accuracy, "reference": net.members[-1].name,
              "flops_unit": "FLOPs, 2 per multiply-add; fractions of the last member alone",
              "per_exit_accuracy": dict(zip(net.exit_names, table.per_exit_accuracy(), strict=True)),
              "profiles": [p.to_json() for p in profiles], "candidates": int(search.thresholds.shape[0]),
              "headline": {"default_profile": default, "default_accuracy": dflt.accuracy,
                           "default_flops_fraction": dflt.flops_fraction, "full_accuracy": full.accuracy}}
    config = {**asdict(one), "num_means": len(means_set), "num_selection": table.num_samples}
    bundle = Bundle(bid, heads, joined, net.exit_names, [tuple(s) for s in shapes], profiles, default,
                    config=config, report=report)
    bundle.meta["estimate"] = _combined_estimate(estimates)
    bundle.meta["members"] = [m.name for m in net.members]
    bundle.meta["member_hulls"] = {  # each member alone on the selection split, FLOPs as fractions of the last
        m["name"]: [[round(p["flops"] / joined.full, 6), round(p["accuracy"], 6)] for p in m["hull"]]
        for m in members}
    curve = plot_curves({"cascade (selection hull)": [(p.flops_fraction, p.accuracy) for p in profiles],
                         **{f"{m['name']} alone": [(p["flops"] / joined.full, p["accuracy"]) for p in m["hull"]]
                            for m in members}},
                        f"{spec.name}: cascade vs members (selection split)", full_acc=full.accuracy)
    bundle.save(model_dir, spec, extra_files={"report.json": (json.dumps(report, indent=2) + "\n").encode(),
                                              "curve.png": curve})
    if activate:
        activate_bundle(model_dir, bid, spec=spec, num_exits=net.num_exits)
    summary = {"seconds": seconds, "num_means": len(means_set), "num_selection": table.num_samples,
               "estimate": bundle.meta["estimate"], "members": estimates,
               "bundles": [{"id": bid, **report["headline"]}]}
    if overlapping:
        summary["warnings"] = [f"profile accuracies are measured on a selection split that overlaps the training "
                               f"data of {', '.join(overlapping)}: optimistic"]
    return [bid], summary


def _boundaries(net: CascadeNetwork) -> set[int]:
    """Sequence indices of the members' classifiers before the last (the hand-over exits)."""
    return {off + m.num_exits - 1 for off, m in zip(net.offsets[:-1], net.members[:-1], strict=True)}


def _combined_estimate(estimates: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One provenance record for the bundle: overlapping when any member overlaps, unknown when any is."""
    values = [e["overlaps_training"] for e in estimates.values()]
    first = next(iter(estimates.values()))
    overlaps = True if any(v is True for v in values) else (None if any(v is None for v in values) else False)
    label = "; ".join(f"{n}: {e['label']}" for n, e in estimates.items())
    return {"samples": first["samples"], "source": first["source"], "selection": first["selection"],
            "overlaps_training": overlaps, "label": label, "members": estimates}
