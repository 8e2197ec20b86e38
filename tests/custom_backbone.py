"""An example of a user's own backbone, plugged in as ``tests.custom_backbone:tiny_convnet``.

The entrypoint returns a ``StagedNetwork``: the module (owning all parameters), its stages in order,
their names, and the head that turns the last stage's output into logits.
"""

from __future__ import annotations

from torch import nn

from service.backbones.staged import FlattenLinearHead, StagedNetwork


def tiny_convnet(num_classes: int = 10, width: int = 8) -> StagedNetwork:
    net = nn.Module()
    net.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
    net.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
    net.fc = nn.Linear(2 * width, num_classes)
    head = FlattenLinearHead(net.fc)

    def forward(x):
        return head(net.block2(net.block1(x)))

    net.forward = forward  # type: ignore[method-assign]
    return StagedNetwork(net, [net.block1, net.block2], ["block1", "block2"], head, input_size=(32, 32))
