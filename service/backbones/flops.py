"""Per-stage FLOPs and feature shapes, measured with ``torch.utils.flop_counter.FlopCounterMode``.

Convention (everywhere in this project): FLOPs count **2 per multiply-add** (what FlopCounterMode counts
for convolutions and matmuls). BatchNorm, ReLU, additions and pooling count 0, as in FlopCounterMode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from service.backbones.staged import StagedNetwork


@dataclass(frozen=True)
class StageProfile:
    """``stage_flops[j]``: FLOPs of stage j alone (the head is the last entry); ``shapes[j]``: (C, H, W)."""

    stage_flops: list[int]
    shapes: list[tuple[int, ...]]

    @property
    def total(self) -> int:
        return int(sum(self.stage_flops))

    @property
    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for f in self.stage_flops:
            acc += f
            out.append(acc)
        return out


def _count(fn, *args) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


@torch.inference_mode()
def profile_stages(net: StagedNetwork, input_size: tuple[int, int] | None = None) -> StageProfile:
    """FLOPs of each stage and of the head for one ``3 x H x W`` image (batch 1)."""
    h, w = input_size or net.input_size
    net.eval()
    x = torch.zeros(1, 3, h, w, device=net.device)
    flops, shapes = [], []
    for stage in net.stages:
        f, x = _count(stage, x)
        flops.append(f)
        shapes.append(tuple(x.shape[1:]))
    f, logits = _count(net.head, x)
    flops.append(f)
    shapes.append(tuple(logits.shape[1:]))
    return StageProfile(flops, shapes)


@torch.inference_mode()
def whole_model_flops(net: StagedNetwork, input_size: tuple[int, int] | None = None) -> int:
    h, w = input_size or net.input_size
    net.eval()
    f, _ = _count(net.module, torch.zeros(1, 3, h, w))
    return f
