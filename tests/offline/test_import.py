"""``classmeans import``: checkpoints built in tmp dirs (never downloaded) become verified model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from service.backbones import build_backbone
from service.cli.main import main
from service.store.model_dir import load_model, read_spec, sha256_file

CLASSES = [f"c{i}" for i in range(10)]


def _resnet20_state(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_backbone({"family": "cifar_resnet", "depth": 20}, num_classes)
    for m in net.module.modules():  # non-trivial BN statistics, so a wrong load would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.module.state_dict()


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _import(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["import", str(ckpt), "--arch", "resnet20", "--classes", ",".join(CLASSES), "--out", str(out),
            "--normalize", "cifar10", *extra]


def _logits(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    _, net = load_model(model_dir)
    with torch.inference_mode():
        return net.module(x)


def test_th_with_nested_state_dict_and_module_prefix(tmp_path, capsys):
    """The layout of the widely shared CIFAR ResNet checkpoints: {'state_dict': {'module.conv1.weight': ...}}."""
    state = _resnet20_state()
    ckpt = tmp_path / "resnet20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.3, "epoch": 200},
               ckpt)
    out = tmp_path / "store" / "r20"
    rc, stdout, err = _run(_import(ckpt, out), capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["exits"] == 11 and summary["classes"] == 10
    spec = read_spec(out)
    assert spec.weights_sha256 == sha256_file(out / "weights.safetensors")
    assert spec.extra["imported_from"] == {"file": "resnet20.th", "sha256": sha256_file(ckpt)}
    assert "training_data" not in spec.extra
    ref = build_backbone({"family": "cifar_resnet", "depth": 20}, 10).module.eval()
    ref.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(_logits(out, x), ref(x))
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no staging left


def test_safetensors_torchvision_crop_and_classes_from_folder(tmp_path, capsys):
    for c in ("zebra", "ant", "moth"):
        (tmp_path / "data" / c).mkdir(parents=True)
    torch.manual_seed(1)
    net = build_backbone({"family": "torchvision", "name": "resnet18"}, 3)
    save_file({k: v.contiguous() for k, v in net.module.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "m"
    rc, _, err = _run(["import", str(tmp_path / "w.safetensors"), "--arch", "resnet18", "--classes",
                            str(tmp_path / "data"), "--out", str(out), "--input-size", "64",
                            "--resize-shorter", "73", "--normalize", "imagenet",
                            "--trained-on", "mydata", "--trained-images", "300", "--held-out", "60"], capsys)
    assert rc == 0, err
    spec = read_spec(out)
    assert spec.classes == ["ant", "moth", "zebra"]
    assert spec.preprocessing.describe() == "Resize(73) + CenterCrop((64, 64))"
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.extra["training_data"] == {"source": "mydata", "images": 300, "held_out": 60,
                                           "split": "stratified split_holdout", "seed": 0, "trained_on": 240}


def test_fp16_state_dict_with_model_key_and_class_file(tmp_path, capsys):
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in _resnet20_state().items()}
    ckpt = tmp_path / "half.pt"
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, ckpt)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rc, _, err = _run(["import", str(ckpt), "--arch", "resnet20", "--classes", str(tmp_path / "classes.txt"),
                       "--out", str(tmp_path / "m"), "--normalize", "cifar10"], capsys)
    assert rc == 0, err
    assert load_model(tmp_path / "m")[1].module.conv1.weight.dtype == torch.float32


def test_custom_entrypoint(tmp_path, capsys):
    net = build_backbone({"family": "custom", "entrypoint": "tests.custom_backbone:tiny_convnet",
                          "kwargs": {"width": 4}}, 2)
    torch.save(net.module.state_dict(), tmp_path / "c.pth")
    rc, _, err = _run(["import", str(tmp_path / "c.pth"), "--arch", "tests.custom_backbone:tiny_convnet",
                       "--arch-kwargs", '{"width": 4}', "--classes", "cat,dog", "--out", str(tmp_path / "m"),
                       "--input-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"], capsys)
    assert rc == 0, err
    assert read_spec(tmp_path / "m").architecture["kwargs"] == {"width": 4}


class NotAStateDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


@pytest.mark.parametrize("case, expect", [
    ("missing", "missing 1 key\\(s\\): linear.bias"),
    ("shape", "shape mismatch in layer 'layer1.0.conv1'"),
    ("classes", "classifier 'linear' has 7 outputs, but 10 classes were given"),
    ("pickle", "pickle that needs code to load .*weights_only=True"),
    ("arch", "different architecture"),
    ("notdict", "not a state dict"),
])
def test_clear_errors_and_nothing_written(tmp_path, capsys, case, expect):
    state = _resnet20_state()
    ckpt = tmp_path / "bad.pth"
    if case == "missing":
        del state["linear.bias"]
    elif case == "shape":
        state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    elif case == "classes":
        state = _resnet20_state(num_classes=7)
    elif case == "arch":
        state = build_backbone({"family": "torchvision", "name": "resnet18"}, 10).module.state_dict()
    elif case == "notdict":
        state = {"epoch": 3, "notes": "hello"}
    if case == "pickle":
        torch.save(NotAStateDict(), ckpt)
    else:
        torch.save(state, ckpt)
    out = tmp_path / "m"
    rc, _, err = _run(_import(ckpt, out), capsys)
    assert rc == 2
    assert __import__("re").search(expect, err), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


def test_refuses_existing_dir_unknown_suffix_and_missing_normalisation(tmp_path, capsys):
    ckpt = tmp_path / "w.pth"
    torch.save(_resnet20_state(), ckpt)
    out = tmp_path / "m"
    assert _run(_import(ckpt, out), capsys)[0] == 0
    before = sha256_file(out / "weights.safetensors")
    rc, _, err = _run(_import(ckpt, out), capsys)
    assert rc == 2 and "already exists" in err and sha256_file(out / "weights.safetensors") == before
    (tmp_path / "w.onnx").write_bytes(b"x")
    rc, _, err = _run(_import(tmp_path / "w.onnx", tmp_path / "m2"), capsys)
    assert rc == 2 and "expected .safetensors" in err
    rc, _, err = _run(["import", str(ckpt), "--arch", "resnet20", "--classes", ",".join(CLASSES),
                       "--out", str(tmp_path / "m3")], capsys)
    assert rc == 2 and "--normalize" in err
    rc, _, err = _run(["import", str(ckpt), "--arch", "resnet50", "--classes", ",".join(CLASSES),
                       "--out", str(tmp_path / "m3"), "--normalize", "imagenet"], capsys)
    assert rc == 2 and "--input-size" in err


def test_torchvision_features_family_and_its_class_count_error(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_backbone({"family": "torchvision", "name": "mobilenet_v3_small"}, 5)
    torch.save({"model_state_dict": net.module.state_dict()}, tmp_path / "mnv3.pth")
    args = ["import", str(tmp_path / "mnv3.pth"), "--arch", "mobilenet_v3_small", "--input-size", "64",
            "--resize-shorter", "72", "--normalize", "imagenet"]
    rc, stdout, err = _run([*args, "--classes", "a,b,c,d,e", "--out", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["exits"] == 14
    rc, _, err = _run([*args, "--classes", "a,b,c", "--out", str(tmp_path / "m2")], capsys)
    assert rc == 2 and "classifier 'classifier.3' has 5 outputs, but 3 classes were given" in err
