"""The class-means decision table: top probability and prediction of every sample at every exit.

Built once from one pass over a labelled selection set; then any number of threshold vectors are
evaluated from it without touching the network. It is the one-criterion case of the generic
:class:`~service.earlyexit.cascade_table.CascadeTable` (score: the class-means top probability, disabled at
``T >= 1``), which does the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from service.earlyexit.cascade_table import CascadeTable
from service.earlyexit.costs import ExitCosts


@dataclass
class DecisionTable:
    """``top_prob (N, M)`` float32, ``pred (N, M)`` int64, ``labels (N,)`` int64.

    Column ``M - 1`` is the network's own classifier; it always accepts. Thresholds are ``(S, M-1)``.
    """

    top_prob: torch.Tensor
    pred: torch.Tensor
    labels: torch.Tensor
    cascade: CascadeTable = field(init=False, repr=False)
    num_samples: int = field(init=False, repr=False)  # N
    num_exits: int = field(init=False, repr=False)  # M

    def __post_init__(self) -> None:
        if self.top_prob.shape != self.pred.shape or self.top_prob.ndim != 2:
            raise ValueError("top_prob and pred must both be (N, M)")
        if self.labels.shape != (self.top_prob.shape[0],):
            raise ValueError("labels must be (N,)")
        self.cascade = CascadeTable(self.top_prob[:, :-1].unsqueeze(1), (1.0,), self.pred, self.labels)
        self.num_samples, self.num_exits = self.cascade.num_samples, self.cascade.num_exits

    def per_exit_accuracy(self) -> list[float]:
        """Accuracy of each exit's own prediction (nearest class mean; the head's argmax last)."""
        return (self.pred == self.labels.unsqueeze(1)).double().mean(0).tolist()

    def _check(self, thresholds: torch.Tensor, costs: ExitCosts | None = None) -> torch.Tensor:
        if thresholds.ndim != 2 or thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"thresholds must be (S, {self.num_exits - 1})")
        if costs is not None and costs.num_exits != self.num_exits:
            raise ValueError("costs and table disagree on the number of exits")
        return thresholds.unsqueeze(1)  # (S, 1, M-1): the one criterion

    def exit_indices(self, thresholds: torch.Tensor) -> torch.Tensor:
        """Eq. 6-7 for ``(S, M-1)`` thresholds -> ``(S, N)`` index of the first exit with ``p > T``."""
        return self.cascade.exit_indices(self._check(thresholds))

    def exit_counts(self, thresholds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(S, M-1)`` thresholds -> (samples leaving at each exit ``(S, M)``, correct among them ``(S, M)``);
        bit-parallel (:meth:`CascadeTable.exit_counts`)."""
        return self.cascade.exit_counts(self._check(thresholds))

    def evaluate(self, thresholds: torch.Tensor, costs: ExitCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, M-1)`` thresholds -> (mean FLOPs ``(S,)`` float64, accuracy ``(S,)`` float64)."""
        return self.cascade.evaluate(self._check(thresholds, costs), costs.cascade())

    def evaluate_reference(self, thresholds: torch.Tensor, costs: ExitCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`evaluate`, written plainly over ``(S, N, M)`` masks (slow; for tests)."""
        return self.cascade.evaluate_dense(self._check(thresholds, costs), costs.cascade())

    def exit_histogram(self, thresholds: torch.Tensor) -> torch.Tensor:
        """``(M-1,)`` thresholds -> ``(M,)`` share of samples leaving at each exit."""
        exits = self.exit_indices(thresholds.view(1, -1))[0]
        return torch.bincount(exits, minlength=self.num_exits).double() / max(1, self.num_samples)
