"""Store-level operations shared by the CLI and the HTTP admin plane: calibrate, evaluate, activate.

Each takes a model directory and in-memory data, so neither front end reimplements the other.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.backbones import StagedNetwork
from service.backbones.preprocess import Normalizer
from service.ingest.labelled import LabelledImages
from service.offline.calibration import CalibrationConfig, CalibrationResult, StatusFn, calibrate
from service.offline.distributed import DataParallel
from service.offline.estimates import SelectionOverlapError, SelectionSplit, overlap_message, provenance
from service.offline.evaluation import decision_table_for, evaluate_report, plot_curves
from service.offline.features import plain_forward_seconds
from service.store.active import activate_bundle, resolve_bundle
from service.store.bundles import new_bundle_id
from service.store.cascade_dir import is_cascade
from service.store.model_dir import ModelSpec, load_model, read_spec


def calibrate_model(model_dir: Path, data: LabelledImages, cfg: CalibrationConfig, holdout: int | float = 5000,
                    activate: bool = True, status: StatusFn | None = None, tag: str = "",
                    loaded: tuple[ModelSpec, StagedNetwork] | None = None, measure_forward: int = 0,
                    source: str | None = None, on_overlap: str = "label", dp: DataParallel | None = None,
                    select_on: LabelledImages | None = None, select_source: str | None = None,
                    ) -> tuple[list[str], dict[str, Any]]:
    """Calibrate every head variant of ``cfg`` into its own bundle; the first one is activated.

    ``holdout``: number (or fraction when < 1) of samples kept out of the means for threshold selection;
    ignored when ``cfg.selection == "means"`` (the paper's protocol) and when ``select_on`` is given.
    ``select_on``: a separate selection dataset (``select_source`` its file name): class means from all of
    ``data``, thresholds chosen on ``select_on``. The honest path for a checkpoint trained on all of its
    training set: means from that set, thresholds from data it never saw (provenance checks the name).
    ``source``: the data's file/folder name, checked against ``model.json``'s ``extra.training_data``; when the
    selection split overlaps the backbone's training data, ``on_overlap="refuse"`` raises
    :class:`SelectionOverlapError` before any work, ``"label"`` writes the bundle labelled (and warns).
    ``dp``: data-parallel (torchrun): every process calls this with the same data and computes its share; the
    statistics are all-reduced and only the first process writes (and activates) the bundles; the others
    return no ids.
    Returns the new bundle ids and a summary report. A cascade of models (service/store/cascade_dir.py) is
    calibrated by :func:`~service.offline.cascade_calibration.calibrate_cascade` (one process, first head variant).
    """
    if is_cascade(read_spec(model_dir)) if loaded is None else is_cascade(loaded[0]):
        from service.offline.cascade_calibration import calibrate_cascade

        if dp is not None:
            raise ValueError("a cascade calibrates in one process (no torchrun)")
        return calibrate_cascade(model_dir, data, cfg, holdout, activate, status, tag, loaded,  # type: ignore[arg-type]
                                 source, on_overlap, select_on, select_source)
    spec, net = loaded or load_model(model_dir)
    data = data.remap_to(spec.classes)
    if select_on is not None:
        means_set, selection, split = _separate_selection(data, select_on.remap_to(spec.classes), cfg,
                                                          select_source)
    else:
        means_set, selection, split = _split_for_selection(data, cfg, holdout, source)
    training_data = spec.extra.get("training_data")
    estimate = provenance(training_data, split)
    if estimate["overlaps_training"] and on_overlap == "refuse":
        raise SelectionOverlapError(overlap_message(training_data, split))
    norm = Normalizer(spec.mean, spec.std)
    if dp is not None:
        dp.barrier()  # every process has its data: the timings below start together
    t0 = time.perf_counter()
    result = calibrate(net, spec.classes, norm, means_set, selection, cfg, status, dp=dp)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"seconds": seconds, "timings": result.timings, "num_means": result.num_means,
                               "num_selection": result.num_selection,
                               "images_per_second_pass1": len(means_set) / result.timings["pass1_means_seconds"],
                               "estimate": estimate}
    if estimate["overlaps_training"] is not False:
        summary["warnings"] = [f"profile accuracies are measured on a selection split that {estimate['label']}"
                               if estimate["overlaps_training"] else
                               f"profile accuracies: {estimate['label']} (say what trained the backbone in "
                               "model.json extra.training_data to have the overlap checked)"]
    if dp is not None:
        summary["processes"] = dp.world
        if not dp.is_main:
            return [], summary
    if measure_forward:
        sub = means_set.images[:measure_forward]
        fwd = plain_forward_seconds(net, sub, norm, cfg.batch_size)
        summary["plain_forward_images_per_second"] = len(sub) / fwd
        summary["pass1_throughput_ratio_to_plain_forward"] = summary["images_per_second_pass1"] / (len(sub) / fwd)
    ids = []
    for variant in result.variants:
        bid, headline = _save_variant(model_dir, spec, result, variant, cfg, tag, estimate,
                                      dp.world if dp is not None else 1)
        ids.append(bid)
        summary.setdefault("bundles", []).append({"id": bid, **headline})
    if activate and ids:
        activate_bundle(model_dir, ids[0], spec=spec, num_exits=net.num_exits)
    return ids, summary


def _split_for_selection(data: LabelledImages, cfg: CalibrationConfig, holdout: int | float, source: str | None
                         ) -> tuple[LabelledImages, LabelledImages | None, SelectionSplit]:
    """(means data, selection data or None for the paper's protocol, the split as provenance records it)."""
    n_hold = round(holdout * len(data)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if cfg.selection == "means":
        means_set, selection = data, None
    else:
        means_set, selection = data.split_holdout(n_hold, seed=cfg.seed)
        if len(selection) == 0:
            raise ValueError("holdout selection needs at least one held-out sample (use --holdout)")
    split = SelectionSplit(source, len(data), 0 if selection is None else n_hold, cfg.seed, cfg.selection,
                           len(selection) if selection is not None else len(means_set))
    return means_set, selection, split


def _separate_selection(data: LabelledImages, select_on: LabelledImages, cfg: CalibrationConfig,
                        source: str | None) -> tuple[LabelledImages, LabelledImages, SelectionSplit]:
    """Means from all of ``data``, thresholds on ``select_on`` (its own source, checked by provenance)."""
    if cfg.selection == "means":
        raise ValueError("a separate selection dataset chooses thresholds on itself: not with --selection means")
    if len(select_on) == 0:
        raise ValueError("the selection dataset is empty")
    return data, select_on, SelectionSplit(source, len(select_on), 0, cfg.seed, "separate", len(select_on))


def _save_variant(model_dir: Path, spec: ModelSpec, result: CalibrationResult, variant, cfg: CalibrationConfig,
                  tag: str, estimate: dict[str, Any], processes: int) -> tuple[str, dict[str, Any]]:
    """Write one head variant as a bundle (with its report and curve); returns (id, headline)."""
    bid = new_bundle_id(tag)
    report = variant_report(result, variant)
    bundle = result.bundle(variant, bid, cfg, report)
    bundle.meta["estimate"] = estimate
    bundle.meta["calibration_processes"] = processes
    curve = plot_curves({"selection hull": [(p.flops_fraction, p.accuracy) for p in variant.profiles]},
                        f"{spec.name} {variant.head_config.key} (selection split)",
                        full_acc=report["full_network_accuracy"])
    bundle.save(model_dir, spec, extra_files={"report.json": (json.dumps(report, indent=2) + "\n").encode(),
                                              "curve.png": curve})
    return bid, report["headline"]


def variant_report(result: CalibrationResult, variant) -> dict[str, Any]:
    per_exit = variant.table.per_exit_accuracy()
    full = next(p for p in variant.profiles if p.name == "full")
    default = next(p for p in variant.profiles if p.name == variant.default_profile)
    return {
        "heads": asdict(variant.head_config),
        "selection_samples": variant.table.num_samples,
        "full_network_accuracy": full.accuracy,
        "per_exit_ncm_accuracy": {result.exit_names[j]: per_exit[j] for j in sorted(variant.heads)},
        "profiles": [p.to_json() for p in variant.profiles],
        "candidates": int(variant.search.thresholds.shape[0]),
        "headline": {"heads": variant.head_config.key, "default_profile": default.name,
                     "default_accuracy": default.accuracy, "default_flops_fraction": default.flops_fraction,
                     "full_accuracy": full.accuracy},
    }


def evaluate_model(model_dir: Path, data: LabelledImages, bundle_id: str | None = None,
                   progress=None, loaded: tuple[ModelSpec, StagedNetwork] | None = None,
                   ) -> tuple[dict[str, Any], bytes]:
    """Measure the (active) bundle on labelled data -> (report, PNG of the curve)."""
    spec, net = loaded or load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, bundle_id)
    data = data.remap_to(spec.classes)
    if is_cascade(spec):
        from service.offline.cascade_calibration import cascade_table

        table = cascade_table(net, bundle, data, progress=progress)  # type: ignore[arg-type]
    else:
        table = decision_table_for(net, bundle, data, Normalizer(spec.mean, spec.std), progress=progress)
    report = evaluate_report(bundle, table)
    png = plot_curves({f"{bundle.bundle_id} (measured)": [(c["flops_fraction"], c["accuracy"])
                                                          for c in report["curve"]]},
                      f"{spec.name}: accuracy vs FLOPs on {len(data)} samples",
                      full_acc=report["full_network_accuracy"])
    return report, png
