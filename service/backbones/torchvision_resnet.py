"""torchvision ResNet family split into exits, as in the E2CM authors' code.

Exit 0 is the raw ``conv1`` output (before BN, ReLU and max-pool, as the authors took it); every
bottleneck/basic block of ``layer1..layer4`` is an exit; the head is avgpool + fc. Built with
``weights=None``: weights only ever come from the model directory, never from the network.
"""

from __future__ import annotations

from torch import nn

from service.backbones.staged import FlattenLinearHead, Sequence_, StagedNetwork

NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)


def torchvision_resnet(name: str, num_classes: int = 10, input_size: int = 32) -> StagedNetwork:
    if name not in NAMES:
        raise ValueError(f"unknown torchvision ResNet {name!r}; choose one of {', '.join(NAMES)}")
    import torchvision  # here, not at module level: it costs ~170 MB of RSS in processes that never use it

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    blocks = [(f"layer{li}.{bi}", blk) for li in range(1, 5)
              for bi, blk in enumerate(getattr(net, f"layer{li}"))]
    stages: list[nn.Module] = [Sequence_(net.conv1)]
    names = ["conv1"]
    first_name, first_block = blocks[0]
    stages.append(Sequence_(net.bn1, net.relu, net.maxpool, first_block))
    names.append(first_name)
    for bname, blk in blocks[1:]:
        stages.append(Sequence_(blk))
        names.append(bname)
    return StagedNetwork(net, stages, names, FlattenLinearHead(net.fc), input_size=(input_size, input_size))
