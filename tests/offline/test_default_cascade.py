"""The embedded default is a cascade of the store's two CIFAR-10 networks: it loads, it was chosen honestly, and
served == offline on real images."""

from __future__ import annotations

import json

import pytest
import torch

from service.api.settings import DEFAULT_MODEL
from service.earlyexit.policy import class_means_policy
from service.ingest.npz import load_npz
from service.offline.cascade_calibration import cascade_table
from service.serving.runners import RunnerOptions, make_runner
from service.store.active import resolve_bundle
from service.store.bundles import read_active, read_bundle
from service.store.cascade_dir import is_cascade, member_names
from service.store.model_dir import load_model, read_spec
from tests.factories import CIFAR_DIR, REPO

MODEL_DIR = REPO / "model_store" / DEFAULT_MODEL
REPORT = REPO / "docs" / "cascade.json"


def test_default_is_a_cascade_of_members_trained_without_the_selection_split():
    spec = read_spec(MODEL_DIR)
    assert is_cascade(spec)
    for name in member_names(spec):
        record = read_spec(REPO / "model_store" / name).extra["training_data"]
        assert record["held_out"] == 5000 and record["seed"] == 0 and record["source"] == "train.npz", name
    estimate = read_bundle(MODEL_DIR, read_active(MODEL_DIR)["bundle"]).meta["estimate"]
    assert estimate["overlaps_training"] is False and estimate["samples"] == 5000, estimate


def test_default_cascade_loads_and_its_report_is_its_bundle():
    spec, net = load_model(MODEL_DIR)
    bundle = resolve_bundle(MODEL_DIR, spec, net.num_exits, None)
    report = json.loads(REPORT.read_text())
    assert report["bundle"] == bundle.bundle_id and report["members"] == member_names(spec)
    assert any(p.flops_fraction < 0.5 for p in bundle.profiles)


@pytest.mark.cifar
def test_default_cascade_served_equals_offline_on_cifar10():
    """Every profile, the first 500 test images, the compiled engine: the same exit and prediction as the offline
    decision table for >= 99.9 % of the rows (a float32 tie at a threshold may go either way)."""
    spec, net = load_model(MODEL_DIR)
    bundle = resolve_bundle(MODEL_DIR, spec, net.num_exits, None)
    test = load_npz(CIFAR_DIR / "test.npz", limit=500).remap_to(spec.classes)
    table = cascade_table(net, bundle, test)
    policies = {p.name: class_means_policy(p.name, p.thresholds, bundle.costs) for p in bundle.profiles}
    runner, info = make_runner(RunnerOptions(engine="onnx"), net, bundle.heads, None, list(policies.values()), [])
    assert info["engine"] == "onnx"
    x = net.members[0].normalizer(test.images)
    differ = rows = 0
    for p in bundle.profiles:
        t = torch.tensor(p.thresholds, dtype=torch.float32).view(1, -1)
        ex = table.exit_indices(t)[0]
        got = runner.run(x, policies[p.name])
        pred = table.pred.gather(1, ex.view(-1, 1)).flatten()
        differ += int(((got.exit_index != ex) | (got.pred != pred)).sum())
        rows += len(test)
    assert differ <= 0.001 * rows, f"{differ} of {rows} rows differ"
