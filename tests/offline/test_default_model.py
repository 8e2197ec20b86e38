"""Regression: the committed ResNet-56 (the default cascade's last member) and its own bundle still give the
numbers docs/results.json reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.ingest.npz import load_npz
from service.offline.operations import evaluate_model
from service.store.active import resolve_bundle
from service.store.bundles import read_active, read_bundle
from service.store.estimates import read_measured
from service.store.model_dir import load_model, read_spec
from tests.factories import CIFAR_DIR, REPO, RESNET56

MODEL_DIR = REPO / "model_store" / RESNET56  # docs/results.json is its report
RESULTS = REPO / "docs" / "results.json"


def test_default_model_and_bundle_load():
    """The embedded default loads with its active bundle: no data needed."""
    spec, net = load_model(MODEL_DIR)
    bundle = resolve_bundle(MODEL_DIR, spec, net.num_exits, None)
    assert bundle.num_exits == net.num_exits
    assert (MODEL_DIR / "weights.safetensors").stat().st_size <= 4_000_000
    total = sum(f.stat().st_size for f in (MODEL_DIR / "bundles" / bundle.bundle_id).iterdir())
    assert total <= 10_000_000
    assert any(p.flops_fraction < 1.0 for p in bundle.profiles)


def test_default_model_never_trained_on_its_selection_split():
    """model.json records the 5,000 images held out of training, and the served bundle's thresholds were chosen
    on exactly those (its estimate is labelled disjoint, not optimistic); the test numbers ride along."""
    spec = read_spec(MODEL_DIR)
    record = spec.extra["training_data"]
    assert record["held_out"] == 5000 and record["trained_on"] == 45000 and record["source"] == "train.npz"
    assert spec.extra["training"]["test_acc"] >= 0.9
    bundle_id = read_active(MODEL_DIR)["bundle"]
    estimate = read_bundle(MODEL_DIR, bundle_id).meta["estimate"]
    assert estimate["overlaps_training"] is False, estimate
    assert estimate["samples"] == 5000
    measured = read_measured(MODEL_DIR, bundle_id)
    assert measured["num_samples"] == 10000 and measured["bundle"] == bundle_id


@pytest.mark.cifar
def test_default_bundle_reproduces_the_report():
    expected = json.loads(RESULTS.read_text())["regression"]
    test = load_npz(CIFAR_DIR / "test.npz")
    n = expected["num_samples"]
    report, _ = evaluate_model(MODEL_DIR, test.subset(np.arange(n)))
    assert report["bundle"] == expected["bundle"]
    assert report["full_network_accuracy"] == pytest.approx(expected["full_network_accuracy"], abs=0.002)
    measured = report["default_profile_measured"]
    assert report["default_profile"] == expected["profile"]
    assert measured["accuracy"] == pytest.approx(expected["default_accuracy"], abs=0.002)
    assert measured["flops_fraction"] == pytest.approx(expected["default_flops_fraction"], abs=0.002)
