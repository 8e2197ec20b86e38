"""The time axis measured on a real engine: tables from eager and compiled segments, and `classmeans timing`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.cli.main import main
from service.serving.time_measure import EagerSegments, measure_time_tables, segment_engine
from service.store.active import resolve_bundle
from service.store.model_dir import load_model
from service.store.timing import read_timing
from tests.factories import make_tiny_store, synthetic_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("timing"))


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_time_tables_from_either_engine(tiny, engine):
    spec, net = load_model(tiny)
    bundle = resolve_bundle(tiny, spec, net.num_exits, None)
    segments, used = segment_engine(engine, net, bundle.heads, threads=1)
    assert used == engine and (engine != "torch" or isinstance(segments, EagerSegments))
    tables = measure_time_tables(net, bundle.heads, segments, (3, 32, 32), batch_sizes=(1, 4), repeats=3)
    assert set(tables) == {1, 4}
    for b, t in tables.items():
        assert t.batch_size == b and t.num_exits == net.num_exits
        assert t.full_ms > 0 and min(t.stage_ms) >= 0 and min(t.head_ms) >= 0 and t.call_ms >= 0
        costs = t.exit_costs()
        assert costs.full == pytest.approx(t.full_ms)


def test_timing_command_attaches_profile_times(tiny, tmp_path, capsys):
    data = synthetic_images(300)
    path = tmp_path / "d.npz"
    np.savez(path, images=data.images, labels=data.labels, classes=np.array(data.classes))
    assert main(["timing", "--model-dir", str(tiny), "--data", str(path), "--holdout", "100", "--engine", "onnx",
                 "--batch-sizes", "1,8", "--repeats", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    spec, net = load_model(tiny)
    bundle = resolve_bundle(tiny, spec, net.num_exits, None)
    doc = read_timing(tiny, bundle.bundle_id)
    assert doc is not None and doc["engine"] == "onnx" == out["engine"]
    assert doc["selection"]["samples"] == 100 and set(doc["tables"]) == {"1", "8"}
    full = doc["profiles"]["full"]
    assert full["ms"]["1"] == pytest.approx(doc["full_ms"]["1"], rel=1e-6)  # no exit consulted: the whole net
    assert full["exit_share"][-1] == pytest.approx(1.0)
    for p in doc["profiles"].values():
        assert sum(p["exit_share"]) == pytest.approx(1.0, abs=1e-5)
        assert set(p["ms"]) == {"1", "8"} and all(v > 0 for v in p["ms"].values())


def test_time_search_writes_a_timed_bundle_with_the_same_means(tiny, tmp_path, capsys):
    import shutil

    from service.store.bundle_model import load_bundle
    from service.store.bundles import read_active

    store = tmp_path / "store"
    shutil.copytree(tiny.parent, store)
    model_dir = store / tiny.name
    data = synthetic_images(300)
    path = tmp_path / "d.npz"
    np.savez(path, images=data.images, labels=data.labels, classes=np.array(data.classes))
    assert main(["timing", "--model-dir", str(model_dir), "--data", str(path), "--holdout", "100", "--engine",
                 "torch", "--batch-sizes", "1", "--repeats", "3", "--search", "--samples", "200",
                 "--activate"]) == 0
    out = json.loads(capsys.readouterr().out)
    tb_id = out["time_bundle"]["id"]
    assert tb_id.endswith("time") and read_active(model_dir)["bundle"] == tb_id
    spec, net = load_model(model_dir)
    old = load_bundle(model_dir, out["bundle"], spec, net.num_exits)
    new = load_bundle(model_dir, tb_id, spec, net.num_exits)
    assert new.timing is not None and new.config["cost"] == "time" and new.config["time_search_of"] == old.bundle_id
    for j, head in old.heads.items():  # the same class means, only the thresholds differ
        assert new.heads[j].means.equal(head.means)
    full = new.profile("full")
    assert full.flops == pytest.approx(old.costs.full) and full.extra["selection_ms"] > 0
    for p in new.profiles:
        assert 0 < p.flops_fraction <= 1.0 + 1e-9 and p.extra["cost"] == "time"
        assert new.timing["profiles"][p.name]["ms"]["1"] == pytest.approx(p.extra["selection_ms"], rel=1e-4)
