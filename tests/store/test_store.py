"""Bundles on disk: round trip, validation, atomicity, no pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch

from service.store.active import activate_bundle, resolve_bundle
from service.store.atomic import sweep_tmp, write_json_atomic
from service.store.bundle_model import load_bundle
from service.store.bundles import BundleError, list_bundle_ids, read_active, read_bundle, write_bundle
from service.store.model_dir import ModelDirError, load_model


def test_round_trip_and_checksums(tiny_store):
    model_dir = tiny_store / "tiny"
    spec, net = load_model(model_dir)
    bid = read_active(model_dir)["bundle"]
    bundle = load_bundle(model_dir, bid, spec, net.num_exits)
    assert bundle.num_exits == net.num_exits == 11
    assert set(bundle.heads) == set(range(10))
    files = read_bundle(model_dir, bid)
    assert files.meta["weights_sha256"] == spec.weights_sha256
    assert (files.path / "report.json").is_file() and (files.path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert bundle.profiles[-1].name == "full" and bundle.profiles[-1].flops_fraction == 1.0


def _corrupt_tensors(model_dir, bid, mutate):
    from safetensors.torch import load_file, save_file

    path = model_dir / "bundles" / bid / "tensors.safetensors"
    t = load_file(str(path))
    mutate(t)
    save_file(t, str(path))
    meta_path = path.parent / "bundle.json"
    meta = json.loads(meta_path.read_text())
    import hashlib

    meta["tensors_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.__setitem__("exit3.means", t["exit3.means"][:, :5].contiguous()), "wrong shape"),
    (lambda t: t["exit2.normaliser"].__setitem__(0, float("nan")), "non-finite"),
    (lambda t: t.__setitem__("exit1.means", t["exit1.means"].double()), "float32"),
])
def test_corrupt_bundle_is_refused_clearly(tiny_store, mutate, match):
    model_dir = tiny_store / "tiny"
    spec, net = load_model(model_dir)
    bid = read_active(model_dir)["bundle"]
    _corrupt_tensors(model_dir, bid, mutate)
    with pytest.raises(BundleError, match=match):
        load_bundle(model_dir, bid, spec, net.num_exits)


def test_flipped_byte_fails_the_checksum(tiny_store):
    model_dir = tiny_store / "tiny"
    bid = read_active(model_dir)["bundle"]
    path = model_dir / "bundles" / bid / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(model_dir, bid)


def test_pickle_is_never_loaded(tiny_store):
    model_dir = tiny_store / "tiny"
    bid = read_active(model_dir)["bundle"]
    path = model_dir / "bundles" / bid / "tensors.safetensors"
    torch.save({"exit0.means": torch.zeros(3)}, path)  # a pickle where safetensors belongs
    with pytest.raises(BundleError):
        read_bundle(model_dir, bid)
    (model_dir / "weights.safetensors").write_bytes(b"\x80\x04K\x01.")  # pickle opcodes
    with pytest.raises(ModelDirError):
        load_model(model_dir)


def test_bundle_of_other_weights_is_refused(tiny_store, tmp_path):
    model_dir = tiny_store / "tiny"
    spec, net = load_model(model_dir)
    spec.weights_sha256 = "0" * 64
    with pytest.raises(BundleError) as err:
        resolve_bundle(model_dir, spec, net.num_exits, None)
    assert err.value.code == "bundle_model_mismatch"


def test_failed_write_leaves_nothing_and_tmp_is_swept(tiny_store):
    model_dir = tiny_store / "tiny"
    before = list_bundle_ids(model_dir)
    with pytest.raises(AttributeError):
        write_bundle(model_dir, "new-one", {"x": 1}, {"a": "not a tensor"}, {})  # type: ignore[dict-item]
    assert list_bundle_ids(model_dir) == before
    assert not any(p.name.endswith(".tmp") for p in (model_dir / "bundles").iterdir())
    stale = model_dir / "bundles" / ".crashed.tmp"
    stale.mkdir()
    (model_dir / ".active.json.123.tmp").write_text("{")
    removed = sweep_tmp(model_dir)
    assert stale in removed and not stale.exists()


def test_activate_validates_then_switches(tiny_store):
    model_dir = tiny_store / "tiny"
    first = read_active(model_dir)
    with pytest.raises(BundleError):
        activate_bundle(model_dir, "does-not-exist")
    with pytest.raises(BundleError):
        activate_bundle(model_dir, "../../etc")
    assert read_active(model_dir) == first
    active = activate_bundle(model_dir, first["bundle"], profile="full")
    assert active["version"] == first["version"] + 1 and active["operating"] == {"a": "full"}


def test_atomic_json_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"v": 1})
    write_json_atomic(path, {"v": 2}, mode=0o600)
    assert json.loads(path.read_text()) == {"v": 2}
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
