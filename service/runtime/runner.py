"""The batched exit runner: run a batch stage by stage, let rows leave at their exit, compact, go on.

Each row carries its own threshold vector, so one batch can mix profiles (per-request overrides and
time sharing). At exit ``j`` only the rows still running whose threshold is ``< 1`` consult the class
means; a disabled exit computes nothing. Rows that leave are recorded and removed before the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.backbones import StagedNetwork
from service.earlyexit import ExitCosts, ExitHead


@dataclass
class ExitResult:
    """Per row: ``exit_index (B,)``, ``pred (B,)``, ``confidence (B,)``, ``probs (B, K)``, ``flops (B,)``.

    ``probs`` are the class-means probabilities (Eq. 5) at an early exit, the softmax of the logits at the
    final one; ``flops`` count the backbone up to the exit plus every class-means head consulted.
    """

    exit_index: torch.Tensor
    pred: torch.Tensor
    confidence: torch.Tensor
    probs: torch.Tensor
    flops: torch.Tensor


class ExitRunner:
    def __init__(self, net: StagedNetwork, heads: dict[int, ExitHead], costs: ExitCosts) -> None:
        if costs.num_exits != net.num_exits:
            raise ValueError(f"costs describe {costs.num_exits} exits, the network has {net.num_exits}")
        self.net = net.eval()
        self.heads = heads
        self.costs = costs
        self.num_exits = net.num_exits
        self._head_cost = torch.tensor(costs.head_cost, dtype=torch.float64)
        self._backbone_cum = torch.tensor(costs.backbone_cum, dtype=torch.float64)

    def thresholds_for(self, thresholds: torch.Tensor | list[float], batch: int) -> torch.Tensor:
        t = torch.as_tensor(thresholds, dtype=torch.float32)
        if t.ndim == 1:
            t = t.unsqueeze(0).expand(batch, -1)
        if t.shape != (batch, self.num_exits - 1):
            raise ValueError(f"thresholds must be ({batch}, {self.num_exits - 1}) or ({self.num_exits - 1},)")
        missing = [j for j in range(self.num_exits - 1) if bool((t[:, j] < 1).any()) and j not in self.heads]
        if missing:
            raise ValueError(f"exits {missing} are enabled but have no class means")
        return t

    @torch.inference_mode()
    def run(self, x: torch.Tensor, thresholds: torch.Tensor | list[float]) -> ExitResult:
        """``x (B, 3, H, W)`` normalised images; ``thresholds (B, M-1)`` or ``(M-1,)``."""
        b = x.shape[0]
        t = self.thresholds_for(thresholds, b)
        k = None
        exit_index = torch.full((b,), self.num_exits - 1, dtype=torch.int64)
        pred = torch.zeros(b, dtype=torch.int64)
        conf = torch.zeros(b, dtype=torch.float32)
        probs_out: torch.Tensor | None = None
        consulted = torch.zeros(b, dtype=torch.float64)
        rows = torch.arange(b)  # original row of every row still running
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            tj = t[rows, j]
            ask = tj < 1.0
            if not bool(ask.any()):
                continue
            ask_idx = torch.nonzero(ask).flatten()
            p = self.heads[j].probabilities(feat[ask_idx])
            if probs_out is None:
                k = p.shape[1]
                probs_out = torch.zeros(b, k, dtype=torch.float32)
            consulted[rows[ask_idx]] += self._head_cost[j]
            c, pr = p.max(dim=1)
            fire_local = c > tj[ask_idx]  # Eq. 6-7, strict
            if bool(fire_local.any()):
                leave = ask_idx[fire_local]
                out_rows = rows[leave]
                exit_index[out_rows] = j
                pred[out_rows] = pr[fire_local]
                conf[out_rows] = c[fire_local]
                probs_out[out_rows] = p[fire_local]
                keep = torch.ones(rows.shape[0], dtype=torch.bool)
                keep[leave] = False
                rows = rows[keep]
                feat = feat[keep]
                if rows.numel() == 0:
                    break
        if rows.numel() > 0:
            logits = self.net.head(feat)
            p = torch.softmax(logits.float(), dim=1)
            if probs_out is None:
                k = p.shape[1]
                probs_out = torch.zeros(b, k, dtype=torch.float32)
            c, pr = p.max(dim=1)
            pred[rows], conf[rows], probs_out[rows] = pr, c, p
        assert probs_out is not None
        flops = self._backbone_cum[exit_index] + consulted
        return ExitResult(exit_index, pred, conf, probs_out, flops)
