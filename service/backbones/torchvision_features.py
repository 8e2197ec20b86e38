"""torchvision families beyond ResNet, split into exits automatically from their ``features`` (or trunk) blocks.

One exit per block, the head is the network's own pooling + classifier (so the last exit is its own
prediction). Per family (``weights=None`` always; weights only come from the model directory):

- MobileNetV2/V3: every ``features[i]`` (stem conv, each inverted residual, the last 1x1 conv).
- EfficientNet (B0-B7, V2-S/M/L): the stem, every MBConv/FusedMBConv block of every stage, the last 1x1 conv.
- ConvNeXt: the stem, every CNBlock (a downsampling layer runs at the start of the next stage's first block).
- RegNet (X and Y): the stem, every residual bottleneck block of every stage.
- VGG (11/13/16/19, with or without BN): every ReLU after a convolution (max-pools run at the start of the
  next stage), so no stage output is later changed in place.
- DenseNet (121/161/169/201): the stem (conv0 ... pool0), every dense layer (its output is the running
  concatenation, exactly what the dense block hands on), transitions run at the start of the next block;
  ``norm5`` closes the last stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from service.backbones.staged import Sequence_, StagedNetwork

FAMILIES: dict[str, tuple[str, ...]] = {
    "mobilenet": ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"),
    "efficientnet": (*(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s", "efficientnet_v2_m",
                     "efficientnet_v2_l"),
    "convnext": ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"),
    "regnet": (*(f"regnet_{k}_{s}" for k in ("x", "y")
                 for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")), "regnet_y_128gf"),
    "vgg": tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "densenet": ("densenet121", "densenet161", "densenet169", "densenet201"),
}
NAMES = tuple(n for names in FAMILIES.values() for n in names)

Stages = tuple[list[nn.Module], list[str]]


class PoolFlattenHead(nn.Module):
    """``pre`` (e.g. DenseNet's ReLU), then ``pool`` (global average by default), flatten, then ``classifier``."""

    def __init__(self, classifier: nn.Module, pool: nn.Module | None = None, pre: Callable | None = None,
                 flatten: bool = True) -> None:
        super().__init__()
        self._parts = [classifier, pool, pre]
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classifier, pool, pre = self._parts
        if pre is not None:
            x = pre(x)
        x = pool(x) if pool is not None else nn.functional.adaptive_avg_pool2d(x, 1)
        return classifier(torch.flatten(x, 1) if self.flatten else x)


class DenseStep(nn.Module):
    """One dense layer as a stage: ``x -> cat([x, layer(x)], 1)``, what torchvision's ``_DenseBlock`` builds up."""

    def __init__(self, layer: nn.Module, before: tuple[nn.Module, ...] = ()) -> None:
        super().__init__()
        self._parts = [*before, layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *before, layer = self._parts
        for part in before:
            x = part(x)
        return torch.cat([x, layer(x)], 1)


def _blocks_of(seq: nn.Module, prefix: str) -> Stages:
    return [Sequence_(b) for b in seq], [f"{prefix}.{i}" for i in range(len(seq))]


def _mobilenet(net: nn.Module) -> Stages:
    return [Sequence_(b) for b in net.features], [f"features.{i}" for i in range(len(net.features))]


def _efficientnet(net: nn.Module) -> Stages:
    f = net.features
    stages, names = [Sequence_(f[0])], ["features.0"]
    for i in range(1, len(f) - 1):
        s, n = _blocks_of(f[i], f"features.{i}")
        stages += s
        names += n
    return [*stages, Sequence_(f[-1])], [*names, f"features.{len(f) - 1}"]


def _convnext(net: nn.Module) -> Stages:
    f = net.features
    stages, names, pending = [Sequence_(f[0])], ["features.0"], []
    for i in range(1, len(f)):
        if not isinstance(f[i], nn.Sequential) or not all(type(b).__name__ == "CNBlock" for b in f[i]):
            pending.append(f[i])  # a downsampling layer: runs before the next block
            continue
        for bi, block in enumerate(f[i]):
            stages.append(Sequence_(*pending, block))
            names.append(f"features.{i}.{bi}")
            pending = []
    return stages, names


def _regnet(net: nn.Module) -> Stages:
    stages, names = [Sequence_(net.stem)], ["stem"]
    for si, stage in enumerate(net.trunk_output):
        for bi, block in enumerate(stage):
            stages.append(Sequence_(block))
            names.append(f"trunk_output.{si}.{bi}")
    return stages, names


def _vgg(net: nn.Module) -> Stages:
    stages, names, pending = [], [], []
    for i, layer in enumerate(net.features):
        pending.append(layer)
        if isinstance(layer, nn.ReLU):
            stages.append(Sequence_(*pending))
            names.append(f"features.{i}")
            pending = []
    if pending:  # the final max-pool closes the last stage
        stages[-1] = Sequence_(*stages[-1]._parts, *pending)
    return stages, names


def _densenet(net: nn.Module) -> Stages:
    f = dict(net.features.named_children())
    stages, names = [Sequence_(f["conv0"], f["norm0"], f["relu0"], f["pool0"])], ["stem"]
    before: tuple[nn.Module, ...] = ()
    for name, mod in f.items():
        if name.startswith("transition"):
            before = (mod,)
        elif name.startswith("denseblock"):
            for lname, layer in mod.items():
                stages.append(DenseStep(layer, before))
                names.append(f"features.{name}.{lname}")
                before = ()
    stages[-1] = Sequence_(stages[-1], f["norm5"])
    return stages, names


def _head(family: str, net: nn.Module) -> nn.Module:
    if family == "regnet":
        return PoolFlattenHead(net.fc, net.avgpool)
    if family == "vgg":
        return PoolFlattenHead(net.classifier, net.avgpool)
    if family == "densenet":
        return PoolFlattenHead(net.classifier, pre=torch.relu)
    if family == "convnext":
        return PoolFlattenHead(net.classifier, net.avgpool, flatten=False)
    return PoolFlattenHead(net.classifier, getattr(net, "avgpool", None))


SPLITTERS = {"mobilenet": _mobilenet, "efficientnet": _efficientnet, "convnext": _convnext, "regnet": _regnet,
             "vgg": _vgg, "densenet": _densenet}


def family_of(name: str) -> str:
    for family, names in FAMILIES.items():
        if name in names:
            return family
    raise ValueError(f"unknown torchvision model {name!r}; supported: {', '.join(NAMES)}")


def torchvision_features(name: str, num_classes: int = 10, input_size: int = 32) -> StagedNetwork:
    family = family_of(name)
    import torchvision  # here, not at module level: it costs ~170 MB of RSS in processes that never use it

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    stages, names = SPLITTERS[family](net)
    return StagedNetwork(net, stages, names, _head(family, net), input_size=(input_size, input_size),
                         extra={"family": family})
