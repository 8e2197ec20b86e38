"""The offline decision table: top probability and prediction of every sample at every exit.

Built once from one pass over a labelled selection set; then any number of threshold vectors are
evaluated from it without touching the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.earlyexit.costs import ExitCosts


@dataclass
class DecisionTable:
    """``top_prob (N, M)`` float32, ``pred (N, M)`` int64, ``labels (N,)`` int64.

    Column ``M - 1`` is the network's own classifier; it always accepts.
    """

    top_prob: torch.Tensor
    pred: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.top_prob.shape != self.pred.shape or self.top_prob.ndim != 2:
            raise ValueError("top_prob and pred must both be (N, M)")
        if self.labels.shape != (self.top_prob.shape[0],):
            raise ValueError("labels must be (N,)")

    @property
    def num_samples(self) -> int:
        return int(self.top_prob.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.top_prob.shape[1])

    def per_exit_accuracy(self) -> list[float]:
        """Accuracy of each exit's own prediction (nearest class mean; the head's argmax last)."""
        return (self.pred == self.labels.unsqueeze(1)).double().mean(0).tolist()

    def exit_indices(self, thresholds: torch.Tensor) -> torch.Tensor:
        """Eq. 6-7 for ``(S, M-1)`` thresholds -> ``(S, N)`` index of the first exit with ``p > T``."""
        fires = self.top_prob[:, :-1].unsqueeze(0) > thresholds.to(self.top_prob.dtype).unsqueeze(1)
        always = torch.ones(*fires.shape[:2], 1, dtype=torch.bool)
        fires = torch.cat([fires, always], dim=2).to(torch.uint8)
        return fires.argmax(dim=2)  # the first maximal value: the first exit that fires

    def _check(self, thresholds: torch.Tensor, costs: ExitCosts) -> None:
        if thresholds.ndim != 2 or thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"thresholds must be (S, {self.num_exits - 1})")
        if costs.num_exits != self.num_exits:
            raise ValueError("costs and table disagree on the number of exits")

    def exit_counts(self, thresholds: torch.Tensor, sample_chunk: int = 4096
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(S, M-1)`` thresholds -> (samples leaving at each exit ``(S, M)``, correct among them ``(S, M)``).

        Bit-parallel: for exit ``j`` the samples with ``p > T`` are a suffix of the samples sorted by
        ``p``, so the fire sets for every possible threshold are precomputed as bitsets (one per rank)
        and a threshold becomes a ``searchsorted`` rank. Each vector then costs ``M`` AND/popcount passes
        over ``N / 64`` words. Exact: the same exits as :meth:`exit_indices`.
        """
        s_count, m = thresholds.shape[0], self.num_exits
        t = thresholds.to(self.top_prob.dtype).numpy()
        counts = np.zeros((s_count, m), dtype=np.int64)
        hits = np.zeros((s_count, m), dtype=np.int64)
        top = self.top_prob.numpy()
        correct = (self.pred == self.labels.unsqueeze(1)).numpy()
        for lo in range(0, self.num_samples, sample_chunk):
            p = top[lo:lo + sample_chunk]
            c = correct[lo:lo + sample_chunk]
            n = p.shape[0]
            words = (n + 63) // 64
            onehot = np.zeros((n, words), dtype=np.uint64)
            onehot[np.arange(n), np.arange(n) // 64] = np.left_shift(np.uint64(1),
                                                                     (np.arange(n) % 64).astype(np.uint64))
            alive = np.tile(_pack(np.ones(n, dtype=bool), words), (s_count, 1))
            for j in range(m - 1):
                order = np.argsort(p[:, j], kind="stable")
                # suffix[r] = set of samples whose rank in ascending p is >= r; suffix[n] = empty.
                suffix = np.zeros((n + 1, words), dtype=np.uint64)
                suffix[:n] = np.bitwise_or.accumulate(onehot[order][::-1], axis=0)[::-1]
                rank = np.searchsorted(p[order, j], t[:, j], side="right")  # samples with p <= T
                fire = suffix[rank] & alive
                alive &= ~fire
                counts[:, j] += np.bitwise_count(fire).sum(1, dtype=np.int64)
                hits[:, j] += np.bitwise_count(fire & _pack(c[:, j], words)).sum(1, dtype=np.int64)
            counts[:, m - 1] += np.bitwise_count(alive).sum(1, dtype=np.int64)
            hits[:, m - 1] += np.bitwise_count(alive & _pack(c[:, m - 1], words)).sum(1, dtype=np.int64)
        return counts, hits

    def evaluate(self, thresholds: torch.Tensor, costs: ExitCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, M-1)`` thresholds -> (mean FLOPs ``(S,)`` float64, accuracy ``(S,)`` float64)."""
        self._check(thresholds, costs)
        counts, hits = self.exit_counts(thresholds)
        per_exit_cost = costs.per_exit(thresholds).numpy()
        n = max(1, self.num_samples)
        flops = (counts * per_exit_cost).sum(1) / n
        acc = hits.sum(1) / n
        return torch.from_numpy(flops), torch.from_numpy(acc.astype(np.float64))

    def evaluate_reference(self, thresholds: torch.Tensor, costs: ExitCosts, chunk: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`evaluate`, written plainly over ``(S, N, M)`` masks (slow; for tests)."""
        self._check(thresholds, costs)
        correct = (self.pred == self.labels.unsqueeze(1))  # (N, M)
        flops_out, acc_out = [], []
        for start in range(0, thresholds.shape[0], chunk):
            t = thresholds[start:start + chunk]
            exits = self.exit_indices(t)  # (s, N)
            per_exit_cost = costs.per_exit(t)  # (s, M)
            flops_out.append(torch.gather(per_exit_cost, 1, exits).mean(1))
            hit = torch.gather(correct.t().unsqueeze(0).expand(t.shape[0], -1, -1), 1,
                               exits.unsqueeze(1)).squeeze(1)
            acc_out.append(hit.double().mean(1))
        return torch.cat(flops_out), torch.cat(acc_out)

    def exit_histogram(self, thresholds: torch.Tensor) -> torch.Tensor:
        """``(M-1,)`` thresholds -> ``(M,)`` share of samples leaving at each exit."""
        exits = self.exit_indices(thresholds.view(1, -1))[0]
        return torch.bincount(exits, minlength=self.num_exits).double() / max(1, self.num_samples)


def _pack(mask: np.ndarray, words: int) -> np.ndarray:
    """``(n,)`` booleans -> ``(words,)`` uint64 bitset: bit ``i % 64`` of word ``i // 64`` is sample ``i``."""
    padded = np.zeros(words * 64, dtype=bool)
    padded[: mask.shape[0]] = mask
    as_bytes = np.packbits(padded.reshape(words * 8, 8), axis=1, bitorder="little").reshape(words, 8)
    return as_bytes.view("<u8").reshape(words).astype(np.uint64)
