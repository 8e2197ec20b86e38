"""Several staged networks with the same classes, run one after another: a cascade's exit sequence.

Member ``i`` contributes its ``M_i`` exits (its stages, then its own classifier) to one sequence of
``M = sum_i M_i`` exits, named ``"<member>/<exit>"`` (``"cifar10-resnet20/layer2.1"``). Each member keeps its
own normalisation of the decoded pixels; every member sees the same ``H x W`` image (the members' input size
and resize rule must be equal, checked where a cascade is created). The order and the rules of the sequence
are :mod:`service.earlyexit.model_cascade`'s; this module only holds the networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.backbones.preprocess import Normalizer
from service.backbones.staged import StagedNetwork


@dataclass
class CascadeMember:
    """One network of a cascade: its store name, the network, and its own pixel normalisation."""

    name: str
    net: StagedNetwork
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalizer: Normalizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.normalizer = Normalizer(self.mean, self.std)

    @property
    def num_exits(self) -> int:
        return self.net.num_exits


class CascadeNetwork:
    """The members in order. Offers what serving needs of a network (``num_exits``, ``exit_names``,
    ``input_size``, ``device``, ``module``, ``eval``); the stages are the members' own."""

    def __init__(self, members: Sequence[CascadeMember]) -> None:
        if len(members) < 2:
            raise ValueError("a cascade needs at least two members")
        sizes = {tuple(m.net.input_size) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"cascade members have different input sizes {sorted(sizes)}")
        self.members = list(members)
        self.module = nn.ModuleList([m.net.module for m in members])
        self.input_size: tuple[int, int] = tuple(members[0].net.input_size)  # type: ignore[assignment]
        self.offsets: list[int] = []
        total = 0
        for m in members:
            self.offsets.append(total)
            total += m.num_exits
        self.num_exits = total

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def exit_names(self) -> list[str]:
        return [f"{m.name}/{e}" for m in self.members for e in m.net.exit_names]

    @property
    def member_num_exits(self) -> list[int]:
        return [m.num_exits for m in self.members]

    @property
    def device(self) -> torch.device:
        return self.members[0].net.device

    def eval(self) -> CascadeNetwork:
        for m in self.members:
            m.net.eval()
        return self

    def member_of(self, exit_index: int) -> int:
        """The member that owns sequence exit ``exit_index``."""
        for i in reversed(range(len(self.members))):
            if exit_index >= self.offsets[i]:
                return i
        raise IndexError(exit_index)

    def member_heads(self, heads: dict[int, Any], i: int) -> dict[int, Any]:
        """The heads (by sequence exit) that fall on member ``i``'s early exits, by the member's own exit index."""
        off, m = self.offsets[i], self.members[i].num_exits
        return {j - off: h for j, h in heads.items() if off <= j < off + m - 1}

    def same_normalisation(self, i: int, j: int) -> bool:
        a, b = self.members[i], self.members[j]
        return tuple(a.mean) == tuple(b.mean) and tuple(a.std) == tuple(b.std)

    def renormalise(self, x: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        """Member ``src``'s input ``x (B, 3, H, W)`` as member ``dst`` sees the same pixels: the uint8 pixels are
        recovered exactly (``round((x + shift) / scale)``, errors far below half a level) and normalised again,
        so ``dst`` gets bit for bit what its own normaliser gives for the decoded image."""
        if self.same_normalisation(src, dst):
            return x
        s = self.members[src].normalizer
        pixels = torch.round((x + s.shift.to(x.device)) / s.scale.to(x.device)).clamp_(0, 255).to(torch.uint8)
        return self.members[dst].normalizer(pixels.permute(0, 2, 3, 1))
