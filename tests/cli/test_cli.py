"""The ``classmeans`` command line: train, calibrate, evaluate, profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.cli.main import main
from service.store.bundles import list_bundle_ids, read_active
from service.store.model_dir import load_model
from tests.factories import CIFAR_DIR, make_tiny_model, synthetic_images


def _npz(path, data):
    np.savez(path, images=data.images, labels=data.labels, classes=np.array(data.classes))
    return path


def test_train_writes_weights_and_resumes(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", synthetic_images(64))
    out = tmp_path / "store" / "m"
    ckpt = tmp_path / "ck.ckpt"
    args = ["train", "--arch", "resnet20", "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "32", "--checkpoint", str(ckpt)]
    assert main(args) == 0
    assert ckpt.is_file() and (out / "weights.safetensors").is_file()
    spec, _net = load_model(out)
    assert spec.architecture == {"family": "cifar_resnet", "depth": 20} and spec.num_classes == 10
    # Resuming a finished run trains no further epoch and reproduces the same weights.
    before = (out / "weights.safetensors").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert (out / "weights.safetensors").read_bytes() == before


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_train_resume_with_other_epochs_replans_the_schedule(tmp_path, capsys):
    """``--resume --epochs M`` after a run planned for N epochs continues on the schedule of an M-epoch run
    from the step reached (one-cycle: the anneal fits the remaining epochs), and the report says so."""
    import torch

    from service.offline.training import TrainConfig, _optimizer, _scheduler

    data = _npz(tmp_path / "d.npz", synthetic_images(64))
    out, ckpt = tmp_path / "store" / "m", tmp_path / "ck.ckpt"
    base = ["train", "--arch", "resnet20", "--data", str(data), "--out", str(out), "--batch-size", "32",
            "--checkpoint", str(ckpt)]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "3", "--resume"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    (replan,) = report["schedule_replans"]
    assert (replan["at_epoch"], replan["from_epochs"], replan["to_epochs"]) == (1, 1, 3)
    # The learning rates after the re-plan are those of a run planned for 3 epochs from the start.
    cfg = TrainConfig(epochs=3, batch_size=32)
    sched = _scheduler(_optimizer(torch.nn.Linear(2, 2), cfg), cfg, 3 * 2)
    lrs = []
    for _ in range(6):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert replan["lr_at_resume"] == pytest.approx(lrs[1])
    assert [h["lr"] for h in report["history"][1:]] == pytest.approx([lrs[3], lrs[5]])
    # The record survives a further resume; asking for fewer epochs than trained is a clear error.
    assert main([*base, "--epochs", "3", "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["schedule_replans"] == [replan]
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--resume"]) != 0
    assert "already trained 3 epochs" in capsys.readouterr().err


def test_train_holdout_keeps_the_selection_split_out(tmp_path, monkeypatch):
    """``--holdout N`` trains on exactly the images that ``calibrate --holdout N`` uses for the class means,
    and model.json says so."""
    import service.offline.training as training

    data = synthetic_images(64)
    path = _npz(tmp_path / "d.npz", data)
    seen = {}
    real_train = training.train

    def spy(net, train_set, *a, **kw):
        seen["images"] = train_set.images.copy()
        return real_train(net, train_set, *a, **kw)

    monkeypatch.setattr(training, "train", spy)
    out = tmp_path / "store" / "m"
    assert main(["train", "--arch", "resnet20", "--data", str(path), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--checkpoint", str(tmp_path / "ck.ckpt"), "--holdout", "16"]) == 0
    means_part, selection = data.split_holdout(16, seed=0)
    assert np.array_equal(seen["images"], means_part.images)
    assert not any((seen["images"] == img).all(axis=(1, 2, 3)).any() for img in selection.images)
    record = load_model(out)[0].extra["training_data"]
    assert record == {"source": "d.npz", "images": 64, "holdout_requested": 16, "held_out": len(selection),
                      "split": "stratified split_holdout", "seed": 0, "trained_on": 64 - len(selection)}


def test_calibrate_evaluate_profiles(tmp_path, capsys):
    model_dir = tmp_path / "store" / "tiny"
    make_tiny_model(model_dir)
    data = _npz(tmp_path / "d.npz", synthetic_images(240, seed=1))
    assert main(["calibrate", "--model-dir", str(model_dir), "--data", str(data), "--holdout", "60",
                 "--search", "quantile", "--samples", "300", "--reduction", "pool4,gap", "--batch-size", "60"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [b["heads"] for b in summary["bundles"]] == ["pool4/euclidean/T1", "gap/euclidean/T1"]
    assert len(list_bundle_ids(model_dir)) == 2
    assert read_active(model_dir)["bundle"] == summary["bundles"][0]["id"]
    out_json = tmp_path / "eval" / "report.json"
    assert main(["evaluate", "--model-dir", str(model_dir), "--data", str(data), "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert out_json.with_suffix(".png").is_file()
    assert report["num_samples"] == 240 and len(report["per_exit"]) == 11
    assert 0 <= report["full_network_accuracy"] <= 1
    assert all(0 < c["flops_fraction"] <= 1.0 + 1e-9 for c in report["curve"])
    capsys.readouterr()
    assert main(["profiles", "--model-dir", str(model_dir), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert sum(r["active"] for r in listing["profiles"]) == 1
    assert listing["profiles"][-1]["name"] == "full"


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["calibrate", "--model-dir", str(tmp_path / "none"), "--data", "x.npz"]) == 2
    assert "model.json" in capsys.readouterr().err
    model_dir = tmp_path / "m"
    make_tiny_model(model_dir)
    bad = synthetic_images(40, classes=[f"c{i}" for i in range(10)])
    assert main(["calibrate", "--model-dir", str(model_dir), "--data", str(_npz(tmp_path / "b.npz", bad))]) == 2
    assert "classes not in the model" in capsys.readouterr().err


def test_train_device_errors_are_messages(tmp_path, capsys):
    import torch

    data = _npz(tmp_path / "d.npz", synthetic_images(16))
    base = ["train", "--arch", "resnet20", "--data", str(data), "--out", str(tmp_path / "m"), "--epochs", "1"]
    assert main([*base, "--device", "warp-drive"]) == 2
    assert "unknown device 'warp-drive'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing written
    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    for cmd in ("calibrate", "evaluate"):
        assert main([cmd, "--model-dir", str(model_dir), "--data", str(data), "--device", "warp-drive"]) == 2
        assert "unknown device 'warp-drive'" in capsys.readouterr().err


@pytest.mark.cifar
def test_calibrate_and_evaluate_on_real_cifar10(tmp_path, capsys):
    """Random weights are fine here: the pipeline runs end to end on the real data layout."""
    model_dir = tmp_path / "store" / "r20"
    make_tiny_model(model_dir)
    assert main(["calibrate", "--model-dir", str(model_dir), "--data", str(CIFAR_DIR / "train.npz"),
                 "--limit", "1500", "--holdout", "500", "--samples", "2000", "--reduction", "pool4"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model-dir", str(model_dir), "--data", str(CIFAR_DIR / "test.npz"),
                 "--limit", "500"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert len(brief["per_exit_ncm_accuracy"]) == 11
    # Even random features carry some class information at the shallow exits (colour statistics).
    assert max(a for a in brief["per_exit_ncm_accuracy"][:-1]) > 0.15
