"""Honest estimates: the selection split is checked against the backbone's training data, every estimate comes
with its data and a 95 % interval, and measured test accuracy can be attached to a bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.cli.main import main
from service.earlyexit.intervals import wilson_interval
from service.offline.estimates import SelectionSplit, provenance
from service.store.atomic import write_json_atomic
from service.store.bundles import list_bundle_ids, read_bundle
from service.store.estimates import MEASURED_FILE
from service.store.model_dir import read_spec
from tests.api.conftest import make_settings, serve
from tests.factories import make_tiny_model, synthetic_images

TD = {"source": "train.npz", "images": 200, "held_out": 60, "split": "stratified split_holdout", "seed": 0,
      "trained_on": 140}


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.40383, abs=1e-4) and hi == pytest.approx(0.59617, abs=1e-4)
    lo, hi = wilson_interval(1.0, 10)  # never above 1, and not the degenerate [1, 1]
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.72246, abs=1e-4)
    assert wilson_interval(0.9, 5000)[1] - wilson_interval(0.9, 5000)[0] < 0.02
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


@pytest.mark.parametrize("split, overlaps", [
    (SelectionSplit("train.npz", 200, 60, 0, "holdout", 60), False),     # exactly the held-out split
    (SelectionSplit("test.npz", 100, 30, 0, "holdout", 30), False),      # another source
    (SelectionSplit("train.npz", 200, 60, 1, "holdout", 60), True),      # another seed
    (SelectionSplit("train.npz", 200, 50, 0, "holdout", 50), True),      # another size
    (SelectionSplit("train.npz", 150, 60, 0, "holdout", 60), True),      # a subset (--limit)
    (SelectionSplit("train.npz", 200, 0, 0, "means", 200), True),        # the paper's mode: select on the means data
    (SelectionSplit(None, 200, 60, 0, "holdout", 60), None),             # source unknown
])
def test_overlap_rule(split, overlaps):
    assert provenance(TD, split)["overlaps_training"] is overlaps
    assert provenance(None, split)["overlaps_training"] is None
    assert provenance(None, split)["label"] == "training data unknown"


def test_trained_on_everything_always_overlaps_the_same_source():
    td = {**TD, "held_out": 0, "trained_on": 200}
    assert provenance(td, SelectionSplit("train.npz", 200, 0, 0, "holdout", 0))["overlaps_training"] is True
    assert provenance(td, SelectionSplit("train.npz", 200, 60, 0, "holdout", 60))["overlaps_training"] is True


def _npz(path, data):
    np.savez(path, images=data.images, labels=data.labels, classes=np.array(data.classes))
    return path


@pytest.fixture()
def model_with_training_data(tmp_path):
    model_dir = tmp_path / "store" / "tiny"
    spec = make_tiny_model(model_dir)
    obj = spec.to_json()
    obj["extra"] = {"training_data": TD}
    write_json_atomic(model_dir / "model.json", obj)
    data = _npz(tmp_path / "train.npz", synthetic_images(200, seed=1))
    return model_dir, data


CAL = ["--search", "quantile", "--samples", "200", "--reduction", "pool4", "--batch-size", "100"]


def test_cli_refuses_overlap_labels_when_allowed_and_attaches_measured(model_with_training_data, tmp_path,
                                                                       capsys):
    model_dir, data = model_with_training_data
    base = ["calibrate", "--model-dir", str(model_dir), "--data", str(data), *CAL]
    assert main([*base, "--holdout", "50"]) == 2
    err = capsys.readouterr().err
    assert "overlaps the data that trained the backbone" in err and "--holdout 60 --seed 0" in err
    assert list_bundle_ids(model_dir) == []

    assert main([*base, "--holdout", "50", "--allow-overlap", "--no-activate"]) == 0
    cap = capsys.readouterr()
    assert "WARNING" in cap.err and "OVERLAPS" in cap.err
    overlapping = json.loads(cap.out)["bundles"][0]["id"]
    assert read_bundle(model_dir, overlapping).meta["estimate"]["overlaps_training"] is True

    assert main([*base, "--holdout", "60"]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert "WARNING" not in cap.err and summary["estimate"]["overlaps_training"] is False
    bid = summary["bundles"][0]["id"]
    est = read_bundle(model_dir, bid).meta["estimate"]
    assert est["samples"] == 60 and "held-out split" in est["label"]

    test = _npz(tmp_path / "test.npz", synthetic_images(80, seed=7))
    before = {p.name: p.read_bytes() for p in (model_dir / "bundles" / bid).iterdir()}
    assert main(["evaluate", "--model-dir", str(model_dir), "--data", str(test), "--attach"]) == 0
    capsys.readouterr()
    after = {p.name: p.read_bytes() for p in (model_dir / "bundles" / bid).iterdir()}
    assert set(after) - set(before) == {MEASURED_FILE}
    assert all(after[k] == v for k, v in before.items())  # the bundle itself is untouched

    assert main(["profiles", "--model-dir", str(model_dir), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    for row in listing["profiles"]:
        e = row["estimate"]
        assert e["samples"] == 60 and e["overlaps_training"] is False
        assert e["interval95"] == pytest.approx(list(wilson_interval(row["accuracy"], 60)), abs=1e-6)
        assert e["measured"]["samples"] == 80 and e["measured"]["source"] == "test.npz"
        assert e["interval95"][0] <= row["accuracy"] <= e["interval95"][1]
    assert main(["profiles", "--model-dir", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "60 selection samples" in text and "95% interval" in text and "measured: 80 samples" in text


async def test_get_profiles_shows_estimate_data_interval_and_measured(tiny_store):
    model_dir = tiny_store / "tiny"
    spec = read_spec(model_dir)
    assert "training_data" not in spec.extra
    async with serve(make_settings(tiny_store)) as s:
        body = (await s.client.get("/profiles")).json()
        bid = body["bundle"]
        for p in body["profiles"]:
            e = p["estimate"]
            assert e["data"] == "training data unknown" and e["overlaps_training"] is None
            assert e["samples"] == 100 and e["measured"] is None
            assert e["interval95"][0] < p["accuracy"] < e["interval95"][1] or p["accuracy"] in (0.0, 1.0)
        (model_dir / "bundles" / bid / MEASURED_FILE).write_text(json.dumps({
            "bundle": bid, "source": "test.npz", "num_samples": 1000, "full_network_accuracy": 0.5,
            "profiles": {p["name"]: {"accuracy": 0.25, "flops_fraction": 0.5} for p in body["profiles"]}}))
        body = (await s.client.get("/profiles")).json()
        m = body["profiles"][0]["estimate"]["measured"]
        assert m["accuracy"] == 0.25 and m["samples"] == 1000
        assert m["interval95"] == pytest.approx(list(wilson_interval(0.25, 1000)), abs=1e-6)
        (model_dir / "bundles" / bid / MEASURED_FILE).write_text("{not json")
        r = await s.client.get("/profiles")
        assert r.status_code == 200 and r.json()["profiles"][0]["estimate"]["measured"] is None
