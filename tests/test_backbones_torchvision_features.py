"""torchvision families beyond ResNet: the staged forward equals the model's own, exit by exit; FLOPs add up.

One small member per family, ``weights=None``, 32-48 px inputs, so the test stays fast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.backbones import architecture_from_name, build_backbone, profile_stages, whole_model_flops
from service.backbones.torchvision_features import FAMILIES, NAMES

CASES = [("mobilenet_v2", 32), ("mobilenet_v3_small", 32), ("mobilenet_v3_large", 40), ("efficientnet_b0", 32),
         ("convnext_tiny", 32), ("regnet_y_400mf", 32), ("regnet_x_400mf", 48), ("vgg11_bn", 32), ("vgg11", 32),
         ("densenet121", 32)]


def _hook_points(name: str, net: nn.Module) -> list[tuple[int, nn.Module]]:
    """(exit index, module whose forward output is that exit's feature in the untouched forward pass)."""
    if name.startswith("mobilenet"):
        return list(enumerate(net.features))
    if name.startswith("efficientnet"):
        f = net.features
        mods = [f[0], *[b for i in range(1, len(f) - 1) for b in f[i]], f[-1]]
        return list(enumerate(mods))
    if name.startswith("convnext"):
        f = net.features
        return list(enumerate([f[0], *[b for s in f[1:] if isinstance(s[0], type(f[1][0])) for b in s]]))
    if name.startswith("regnet"):
        return list(enumerate([net.stem, *[b for s in net.trunk_output for b in s]]))
    if name.startswith("vgg"):
        relus = [m for m in net.features if isinstance(m, nn.ReLU)]
        return [*enumerate(relus[:-1]), (len(relus) - 1, net.features)]
    # densenet: the stem ends at pool0; a dense block's output is the exit of its last layer; norm5 ends the net
    f = dict(net.features.named_children())
    points, j = [(0, f["pool0"])], 0
    for key, mod in f.items():
        if key.startswith("denseblock"):
            j += len(mod)
            points.append((j, mod if key != "denseblock4" else f["norm5"]))
    return points


@pytest.mark.parametrize("name, size", CASES, ids=[c[0] for c in CASES])
def test_staged_forward_equals_the_models_forward(name, size):
    torch.manual_seed(0)
    net = build_backbone(architecture_from_name(name), num_classes=7, input_size=size).eval()
    for m in net.module.modules():  # non-trivial BN statistics, so a skipped or repeated BN would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, size, size)
    captured: dict[int, torch.Tensor] = {}
    points = _hook_points(name, net.module)
    hooks = [mod.register_forward_hook(lambda _m, _i, out, j=j: captured.__setitem__(j, out.clone()))
             for j, mod in points]
    with torch.inference_mode():
        try:
            logits = net.module(x)
        finally:
            for h in hooks:
                h.remove()
        feats, out = net.forward_all(x)
    assert len(points) >= 4 and len(feats) == len(net.stage_names) == net.num_exits - 1
    assert torch.allclose(out, logits, rtol=1e-5, atol=1e-5), name
    for j, expected in captured.items():
        assert torch.allclose(feats[j], expected, rtol=1e-5, atol=1e-5), f"{name} exit {j} {net.stage_names[j]}"
    mid = len(feats) // 2
    with torch.inference_mode():
        assert torch.allclose(net.run_stages(x, upto=mid)[-1], feats[mid])


@pytest.mark.parametrize("name, size", CASES, ids=[c[0] for c in CASES])
def test_flops_per_stage_add_up_to_the_whole_model(name, size):
    net = build_backbone(architecture_from_name(name), num_classes=7, input_size=size)
    prof = profile_stages(net)
    assert len(prof.stage_flops) == net.num_exits
    zero = [n for n, f in zip(net.exit_names, prof.stage_flops, strict=True) if f <= 0]
    assert not zero, zero
    assert prof.total == whole_model_flops(net)
    assert prof.shapes[-1] == (7,)


def test_every_name_resolves_and_families_cover_the_brief():
    assert set(FAMILIES) == {"mobilenet", "efficientnet", "convnext", "regnet", "vgg", "densenet"}
    for name in NAMES:
        assert architecture_from_name(name) == {"family": "torchvision", "name": name}
