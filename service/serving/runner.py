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
        self._validated: dict[int, tuple[torch.Tensor, list[float]]] = {}

    def thresholds_for(self, thresholds: torch.Tensor | list[float], batch: int) -> torch.Tensor:
        t = torch.as_tensor(thresholds, dtype=torch.float32)
        if t.ndim == 1:
            t = t.unsqueeze(0).expand(batch, -1)
        if t.shape != (batch, self.num_exits - 1):
            raise ValueError(f"thresholds must be ({batch}, {self.num_exits - 1}) or ({self.num_exits - 1},)")
        enabled = (t < 1).any(dim=0).tolist()
        missing = [j for j, on in enumerate(enabled) if on and j not in self.heads]
        if missing:
            raise ValueError(f"exits {missing} are enabled but have no class means")
        return t

    def _uniform(self, thresholds: torch.Tensor) -> list[float]:
        """A ``(M-1,)`` threshold tensor, validated once and kept as a list (the profiles' tensors live as
        long as their snapshot, so serving one profile validates nothing per batch)."""
        hit = self._validated.get(id(thresholds))
        if hit is not None and hit[0] is thresholds:
            return hit[1]
        tl = self.thresholds_for(thresholds, 1)[0].tolist()
        if len(self._validated) >= 64:
            self._validated.clear()
        self._validated[id(thresholds)] = (thresholds, tl)
        return tl

    @torch.inference_mode()
    def run(self, x: torch.Tensor, thresholds: torch.Tensor | list[float]) -> ExitResult:
        """``x (B, 3, H, W)`` normalised images; ``thresholds (B, M-1)`` or ``(M-1,)``."""
        b = x.shape[0]
        if isinstance(thresholds, torch.Tensor) and thresholds.ndim == 1 and thresholds.dtype == torch.float32:
            return self._run_uniform(x, self._uniform(thresholds))
        t = self.thresholds_for(thresholds, b)
        if b == 1 or bool((t == t[0]).all()):
            return self._run_uniform(x, t[0].tolist())
        return self._run_rows(x, t)

    def _run_uniform(self, x: torch.Tensor, tl: list[float]) -> ExitResult:
        """Every row has the same thresholds ``tl`` (one profile: the common case, and always batch 1).

        The same decisions and FLOPs as :meth:`_run_rows`, with the per-row bookkeeping left out: a
        disabled exit costs no tensor operation at all, every running row consults an enabled exit, the
        FLOPs of the heads consulted are a per-exit table (Python floats, summed in exit order like the
        general path), and a single row stops at its exit without any compaction.
        """
        b, m = x.shape[0], self.num_exits
        exit_index = torch.full((b,), m - 1, dtype=torch.int64)
        pred = torch.zeros(b, dtype=torch.int64)
        conf = torch.zeros(b, dtype=torch.float32)
        probs_out: torch.Tensor | None = None
        consulted = 0.0
        consulted_at = [0.0] * m  # head FLOPs spent by a row that leaves at exit j
        rows: torch.Tensor | None = None  # original row of every row still running (None: all of them)
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            tj = tl[j]
            if tj >= 1.0:
                continue
            p = self.heads[j].probabilities(feat)
            consulted += self.costs.head_cost[j]
            consulted_at[j] = consulted
            c, pr = p.max(dim=1)
            if b == 1:
                if float(c) > tj:  # Eq. 6-7, strict (float32 values compared exactly)
                    flops = torch.tensor([self.costs.backbone_cum[j] + consulted], dtype=torch.float64)
                    return ExitResult(torch.tensor([j]), pr, c, p.float(), flops)
                continue
            fire_local = c > tj
            if not bool(fire_local.any()):
                continue
            out_rows = torch.nonzero(fire_local).flatten() if rows is None else rows[fire_local]
            exit_index[out_rows] = j
            pred[out_rows] = pr[fire_local]
            conf[out_rows] = c[fire_local]
            if probs_out is None:
                probs_out = torch.zeros(b, p.shape[1], dtype=torch.float32)
            probs_out[out_rows] = p[fire_local]
            keep = ~fire_local
            rows = torch.nonzero(keep).flatten() if rows is None else rows[keep]
            feat = feat[keep]
            if rows.numel() == 0:
                break
        consulted_at[m - 1] = consulted
        if rows is None or rows.numel() > 0:
            p = torch.softmax(self.net.head(feat).float(), dim=1)
            c, pr = p.max(dim=1)
            if rows is None:
                pred, conf, probs_out = pr, c, p
            else:
                if probs_out is None:
                    probs_out = torch.zeros(b, p.shape[1], dtype=torch.float32)
                pred[rows], conf[rows], probs_out[rows] = pr, c, p
        assert probs_out is not None
        table = torch.tensor(consulted_at, dtype=torch.float64)
        flops = self._backbone_cum[exit_index] + table[exit_index]
        return ExitResult(exit_index, pred, conf, probs_out, flops)

    def _run_rows(self, x: torch.Tensor, t: torch.Tensor) -> ExitResult:
        """The general path: ``t (B, M-1)``, each row its own thresholds (per-request profiles, mixes)."""
        b = x.shape[0]
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
