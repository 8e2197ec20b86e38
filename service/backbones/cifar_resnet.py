"""CIFAR-style ResNets (He et al. 2016, sec. 4.2): 3 stages of ``n`` basic blocks, 16/32/64 channels.

Depth ``6n + 2``: resnet20 (n=3), 32, 44, 56 (n=9), 110. Option-A shortcuts (identity with stride-2
subsampling and zero-padded channels, no parameters). Module names ``conv1, bn1, layer1..layer3, linear``
match the widely shared layout, so its state dicts load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.backbones.staged import FlattenLinearHead, Sequence_, StagedNetwork

DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class ZeroPadShortcut(nn.Module):
    """Option A: ``x[:, :, ::2, ::2]`` zero-padded from ``c_in`` to ``c_out`` channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.pad = (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ZeroPadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 56, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        n = DEPTHS[depth]
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.stem(x))))
        out = F.avg_pool2d(out, out.size(3))
        return self.linear(torch.flatten(out, 1))


class _Stem(nn.Module):
    def __init__(self, net: CifarResNet) -> None:
        super().__init__()
        self._net = [net]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net[0].stem(x)


def cifar_resnet(depth: int = 56, num_classes: int = 10) -> StagedNetwork:
    """Stages: the stem (conv1, bn1, relu), then every basic block; head: global pool + linear."""
    net = CifarResNet(depth, num_classes)
    stages: list[nn.Module] = [_Stem(net)]
    names = ["stem"]
    for li, layer in enumerate((net.layer1, net.layer2, net.layer3), start=1):
        for bi, block in enumerate(layer):
            stages.append(Sequence_(block))
            names.append(f"layer{li}.{bi}")
    return StagedNetwork(net, stages, names, FlattenLinearHead(net.linear), input_size=(32, 32))
