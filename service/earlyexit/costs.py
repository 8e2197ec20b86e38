"""What exiting at each exit costs, given which exits are consulted (FLOPs, 2 per multiply-add)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.earlyexit.cascade_table import CascadeCosts


@dataclass(frozen=True)
class ExitCosts:
    """``backbone_cum[j]``: backbone FLOPs up to and including exit ``j`` (``M`` values; the last is the
    full network); ``head_cost[j]``: FLOPs of consulting the class-means head at exit ``j`` (``M - 1``
    values; the final exit is the network's own classifier and costs nothing extra). ``skips``: exit ranges
    not run when none of their exits is enabled (a cascade of networks: :class:`CascadeCosts`)."""

    backbone_cum: tuple[float, ...]
    head_cost: tuple[float, ...]
    skips: tuple[tuple[int, int, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.head_cost) != len(self.backbone_cum) - 1:
            raise ValueError("head_cost must have one entry fewer than backbone_cum")

    @property
    def num_exits(self) -> int:
        return len(self.backbone_cum)

    @property
    def full(self) -> float:
        """FLOPs of the plain network (no exit consulted; for a cascade of networks: the last one alone)."""
        return float(self.backbone_cum[-1]) - sum(c for _, _, c in self.skips)

    def cascade(self) -> CascadeCosts:
        """The same table as a one-criterion cascade (the class-means head is the predictor and the score)."""
        return CascadeCosts(self.backbone_cum, self.head_cost, (tuple(0.0 for _ in self.head_cost),), self.skips)

    def per_exit(self, thresholds: torch.Tensor) -> torch.Tensor:
        """``(S, M-1)`` thresholds -> ``(S, M)`` FLOPs of a sample that leaves at each exit.

        ``cost[s, e] = backbone_cum[e] + sum_{j <= e, j < M-1, T[s, j] < 1} head_cost[j]``: every enabled
        exit on the way is consulted, a disabled one (``T >= 1``) costs nothing.
        """
        return self.cascade().per_exit(thresholds.unsqueeze(1), (1.0,))
