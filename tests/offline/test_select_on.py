"""Means from one dataset, thresholds from another (``calibrate --select-on FILE``), with honest provenance."""

from __future__ import annotations

import dataclasses
import json

import pytest

from service.offline.calibration import CalibrationConfig, HeadConfig
from service.offline.estimates import SelectionOverlapError
from service.offline.operations import calibrate_model
from service.store.bundles import bundle_path
from service.store.model_dir import read_spec, save_model
from tests.factories import make_tiny_model, synthetic_images

CFG = CalibrationConfig(heads=[HeadConfig("pool4", "euclidean", 1.0)], search="quantile", samples=200, seed=0,
                        batch_size=100)


def _trained_on_all(model_dir, source: str) -> None:
    """Record that the backbone was trained on all of ``source`` (as an imported public checkpoint would)."""
    from service.store.model_dir import load_model

    spec, net = load_model(model_dir)
    extra = {**spec.extra, "training_data": {"source": source, "images": 300, "held_out": 0, "trained_on": 300}}
    save_model(model_dir, dataclasses.replace(spec, extra=extra), net)


def test_means_from_all_of_the_data_thresholds_from_the_separate_set(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    _trained_on_all(model_dir, "train.npz")
    ids, summary = calibrate_model(model_dir, synthetic_images(300), CFG, holdout=100, source="train.npz",
                                   on_overlap="refuse", select_on=synthetic_images(120, seed=7),
                                   select_source="unseen.npz")
    assert summary["num_means"] == 300 and summary["num_selection"] == 120  # --holdout ignored
    meta = json.loads((bundle_path(model_dir, ids[0]) / "bundle.json").read_text())
    est = meta["estimate"]
    assert est["selection"] == "separate" and est["samples"] == 120 and est["source"] == "unseen.npz"
    assert est["overlaps_training"] is False and "disjoint" in est["label"]


def test_a_separate_set_from_the_training_source_is_refused_or_labelled(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    _trained_on_all(model_dir, "train.npz")
    with pytest.raises(SelectionOverlapError):
        calibrate_model(model_dir, synthetic_images(300), CFG, source="train.npz", on_overlap="refuse",
                        select_on=synthetic_images(120, seed=7), select_source="train.npz")
    _ids, summary = calibrate_model(model_dir, synthetic_images(300), CFG, source="train.npz", on_overlap="label",
                                   select_on=synthetic_images(120, seed=7), select_source="train.npz")
    assert summary["estimate"]["overlaps_training"] is True and summary["warnings"]
    assert read_spec(model_dir).extra["training_data"]["source"] == "train.npz"


def test_the_paper_protocol_takes_no_separate_set(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    with pytest.raises(ValueError, match="separate selection"):
        calibrate_model(model_dir, synthetic_images(200), dataclasses.replace(CFG, selection="means"),
                        select_on=synthetic_images(50, seed=7), select_source="x.npz")
