"""Every adapter: running stages 1..j gives exactly the full forward's feature at j; FLOPs add up."""

from __future__ import annotations

import pytest
import torch

from service.backbones import architecture_from_name, build_backbone, profile_stages, whole_model_flops
from service.backbones.registry import BackboneError
from service.backbones.torchvision_resnet import NAMES as TV_NAMES

CIFAR = [{"family": "cifar_resnet", "depth": d} for d in (20, 32, 44, 56, 110)]
TV = [{"family": "torchvision", "name": n} for n in TV_NAMES]
CUSTOM = [{"family": "custom", "entrypoint": "tests.custom_backbone:tiny_convnet"}]


def _hooked_features(net, x):
    """The features the untouched forward pass produces at each stage's last module."""
    captured = []
    module = net.module
    if hasattr(module, "layer1") and hasattr(module, "bn1") and hasattr(module, "linear"):  # CIFAR ResNet
        targets = [module.bn1] + [b for layer in (module.layer1, module.layer2, module.layer3) for b in layer]
        relu_stem = True
    elif hasattr(module, "layer4"):  # torchvision
        targets = [module.conv1] + [b for i in range(1, 5) for b in getattr(module, f"layer{i}")]
        relu_stem = False
    else:
        targets = [module.block1, module.block2]
        relu_stem = False
    hooks = [t.register_forward_hook(lambda _m, _i, out: captured.append(out)) for t in targets]
    try:
        logits = module(x)
    finally:
        for h in hooks:
            h.remove()
    if relu_stem:
        captured[0] = torch.relu(captured[0])
    return captured, logits


@pytest.mark.parametrize("arch", CIFAR + TV + CUSTOM, ids=lambda a: a.get("name") or str(a.get("depth", "custom")))
def test_stages_reproduce_the_full_forward(arch):
    torch.manual_seed(0)
    net = build_backbone(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected, logits = _hooked_features(net, x)
        feats, out = net.forward_all(x)
    assert len(feats) == len(net.stages) == len(expected)
    for j, (a, b) in enumerate(zip(feats, expected, strict=True)):
        assert torch.allclose(a, b, atol=1e-5), f"stage {j} ({net.stage_names[j]}) differs"
    assert torch.allclose(out, logits, atol=1e-5)
    with torch.inference_mode():
        partial = net.run_stages(x, upto=len(net.stages) // 2)
    assert torch.allclose(partial[-1], expected[len(net.stages) // 2], atol=1e-5)


@pytest.mark.parametrize("arch", [CIFAR[0], CIFAR[3], {"family": "torchvision", "name": "resnet18"},
                                  {"family": "torchvision", "name": "resnet50"}, CUSTOM[0]],
                         ids=["resnet20", "resnet56", "tv-resnet18", "tv-resnet50", "custom"])
def test_stage_flops_add_up_to_the_whole_model(arch):
    net = build_backbone(arch, num_classes=10)
    prof = profile_stages(net)
    assert prof.total == whole_model_flops(net)
    assert all(f >= 0 for f in prof.stage_flops) and prof.cumulative[-1] == prof.total


def test_resnet56_layout_and_flops():
    net = build_backbone({"family": "cifar_resnet", "depth": 56}, 10)
    assert net.num_exits == 29  # stem + 27 blocks + head
    keys = set(net.module.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.8.bn2.weight",
            "linear.weight", "linear.bias"} <= keys
    # ~125.5 M multiply-adds for ResNet-56 at 32x32 (He et al.) -> ~251 MFLOPs at 2 per multiply-add.
    assert 2.4e8 < profile_stages(net).total < 2.6e8


def test_standard_state_dict_loads_strictly():
    a = build_backbone({"family": "cifar_resnet", "depth": 20}, 10)
    b = build_backbone({"family": "cifar_resnet", "depth": 20}, 10)
    b.module.load_state_dict(a.module.state_dict(), strict=True)


def test_architecture_names():
    assert architecture_from_name("resnet56") == {"family": "cifar_resnet", "depth": 56}
    assert architecture_from_name("resnet152") == {"family": "torchvision", "name": "resnet152"}
    assert architecture_from_name("pkg.mod:fn")["family"] == "custom"
    assert architecture_from_name("vgg16") == {"family": "torchvision", "name": "vgg16"}
    with pytest.raises(BackboneError):
        architecture_from_name("alexnet")
    with pytest.raises(BackboneError):
        build_backbone({"family": "custom", "entrypoint": "no_such_module:fn"}, 10)
    with pytest.raises(ValueError):
        build_backbone({"family": "cifar_resnet", "depth": 21}, 10)
