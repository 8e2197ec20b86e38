"""A network split into ordered stages plus a head: the exits of the early-exit method.

Exit ``j`` (0-based) for ``j < len(stages)`` sees the output of ``stages[j]``; the last exit,
index ``len(stages)``, is the network's own classifier ``head`` applied to the last stage's output.
Running ``stages[0..j]`` and stopping yields exactly the feature the full forward pass has at ``j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StagedNetwork:
    """An untouched classifier viewed as ``stages`` followed by ``head``.

    Attributes:
        module: the whole network; it owns every parameter (load state dicts into it).
        stages: ordered callables; ``stages[j]`` maps the previous feature to exit ``j``'s feature.
        stage_names: one readable name per stage (``"stem"``, ``"layer2.3"``), plus ``"head"`` implied.
        head: maps the last stage's feature ``(B, C, H, W)`` to logits ``(B, K)``.
    """

    module: nn.Module
    stages: Sequence[nn.Module]
    stage_names: Sequence[str]
    head: nn.Module
    input_size: tuple[int, int] = (32, 32)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.stage_names):
            raise ValueError("stages and stage_names differ in length")
        if not self.stages:
            raise ValueError("a staged network needs at least one stage")

    @property
    def num_exits(self) -> int:
        """M: one exit per stage plus the head."""
        return len(self.stages) + 1

    @property
    def exit_names(self) -> list[str]:
        return [*self.stage_names, "head"]

    @property
    def device(self) -> torch.device:
        """Where the parameters are (the CPU for a network without any)."""
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def eval(self) -> StagedNetwork:
        self.module.eval()
        return self

    def run_stages(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Features of exits ``0..upto`` (all stages when ``upto`` is None); does not apply the head."""
        last = len(self.stages) - 1 if upto is None else upto
        feats = []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every stage feature and the logits, in one pass."""
        feats = self.run_stages(x)
        return feats, self.head(feats[-1])


class Sequence_(nn.Module):
    """A stage built from existing sub-modules of the network, without copying their parameters."""

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        # Stored in a plain list so the parts stay owned (and state-dict keyed) by the original module.
        self._parts = list(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self._parts:
            x = part(x)
        return x


class FlattenLinearHead(nn.Module):
    """Global average pooling, flatten, then the network's own final linear layer."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self._linear = [linear]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear[0](torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))
