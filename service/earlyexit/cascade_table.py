"""The offline decision table of every exit rule: one generic cascade over cached scores.

Per sample and early exit ``j < E``, ``C`` *criteria*: a score column compared with its own threshold
(``score > T`` fires); an exit fires when any of its criteria fires; the first exit that fires wins and the
last exit (``E``, the network's own classifier) always accepts. Class means alone (:class:`DecisionTable`:
the top probability, one criterion), SDN (IC top probability), BranchyNet (``-H``) and the combined rule
(two criteria) are all this table with other score columns (:meth:`ICDecisionTable.cascade`); the served
counterpart is :class:`~service.earlyexit.policy.ExitPolicy` run by the cascade runner.

Any number of threshold vectors is evaluated from it without touching the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class CascadeCosts:
    """FLOPs of a cascade whose exits may consult several heads.

    ``backbone_cum (M,)``: backbone FLOPs up to each exit (the last: the full network).
    ``base_cost (E,)``: the predicting head at exit ``j``, paid when any criterion is enabled there.
    ``criterion_cost (C, E)``: extra cost of criterion ``c`` at ``j``, paid when that criterion is enabled.
    ``skips``: ``(first, last, cost)`` exit ranges that are skipped, with their ``cost`` (included in
    ``backbone_cum`` from exit ``last`` on), when no criterion is enabled at any exit ``first..last``: the
    members of a cascade of networks before the last (:mod:`service.earlyexit.model_cascade`). A member none
    of whose exits can fire answers nobody, so it is not run: every later exit costs ``cost`` less.
    """

    backbone_cum: tuple[float, ...]
    base_cost: tuple[float, ...]
    criterion_cost: tuple[tuple[float, ...], ...]
    skips: tuple[tuple[int, int, float], ...] = ()

    def __post_init__(self) -> None:
        e = len(self.backbone_cum) - 1
        if len(self.base_cost) != e or any(len(r) != e for r in self.criterion_cost):
            raise ValueError("base_cost and every criterion_cost row need M - 1 entries")
        for first, last, _ in self.skips:
            if not 0 <= first <= last < e:
                raise ValueError(f"skip range {first}..{last} is not within the {e} early exits")

    @property
    def full(self) -> float:
        """The cost of a sample when nothing is enabled: the last exit, skippable ranges skipped."""
        return float(self.backbone_cum[-1]) - sum(c for _, _, c in self.skips)

    def per_exit(self, score_thresholds: torch.Tensor, disable: tuple[float, ...]) -> torch.Tensor:
        """``(S, C, E)`` score-space thresholds -> ``(S, M)`` FLOPs of a sample leaving at each exit."""
        t = score_thresholds.to(torch.float64)
        dis = torch.tensor(disable, dtype=torch.float64).view(1, -1, 1)
        enabled = (t < dis).to(torch.float64)  # (S, C, E)
        any_enabled = enabled.amax(1)  # (S, E)
        crit = torch.tensor(self.criterion_cost, dtype=torch.float64).unsqueeze(0)  # (1, C, E)
        per = any_enabled * torch.tensor(self.base_cost, dtype=torch.float64) + (enabled * crit).sum(1)
        consulted = torch.cumsum(per, dim=1)
        consulted = torch.cat([consulted, consulted[:, -1:]], dim=1)
        out = torch.tensor(self.backbone_cum, dtype=torch.float64).unsqueeze(0) + consulted
        for first, last, cost in self.skips:
            skipped = ~any_enabled[:, first:last + 1].to(torch.bool).any(1)  # (S,)
            out[:, last + 1:] -= cost * skipped.to(torch.float64).unsqueeze(1)
        return out


@dataclass
class CascadeTable:
    """``scores (N, C, E)`` float32, ``pred (N, M)`` int64 (``M = E + 1``), ``labels (N,)`` int64.

    Exit ``j < E`` fires for a sample when ``scores[n, c, j] > T[c, j]`` for some criterion ``c``.
    ``disable[c]``: a score-space threshold at or above which criterion ``c`` can never fire (every score of
    criterion ``c`` is ``<= disable[c]``); it also decides which heads are paid for (:class:`CascadeCosts`).
    """

    scores: torch.Tensor
    disable: tuple[float, ...]
    pred: torch.Tensor
    labels: torch.Tensor
    num_samples: int = field(init=False, repr=False)  # N
    num_criteria: int = field(init=False, repr=False)  # C
    num_exits: int = field(init=False, repr=False)  # M = E + 1

    def __post_init__(self) -> None:
        if self.scores.ndim != 3 or self.pred.ndim != 2:
            raise ValueError("scores must be (N, C, E) and pred (N, E + 1)")
        n, c, e = self.scores.shape
        self.num_samples, self.num_criteria, self.num_exits = int(n), int(c), int(e) + 1
        if self.pred.shape != (n, e + 1) or self.labels.shape != (n,):
            raise ValueError("pred must be (N, E + 1) and labels (N,)")
        if len(self.disable) != c:
            raise ValueError("one disable value per criterion")
        for ci, d in enumerate(self.disable):
            if n and float(self.scores[:, ci].max()) > d:
                raise ValueError(f"criterion {ci} has scores above its disable value {d}")

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3 or t.shape[1:] != self.scores.shape[1:]:
            raise ValueError(f"thresholds must be (S, {self.num_criteria}, {self.num_exits - 1})")
        return t.to(torch.float32)

    def fires(self, thresholds: torch.Tensor) -> torch.Tensor:
        """``(S, C, E)`` -> ``(S, N, C, E)`` booleans: criterion ``c`` would fire at exit ``j``."""
        t = self._check(thresholds)
        return self.scores.unsqueeze(0) > t.unsqueeze(1)

    def exit_indices(self, thresholds: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """``(S, C, E)`` -> ``(S, N)``: index of the first exit where any criterion fires (``E`` if none)."""
        out = []
        for lo in range(0, thresholds.shape[0], chunk):
            f = self.fires(thresholds[lo:lo + chunk]).any(2)  # (s, N, E)
            always = torch.ones(*f.shape[:2], 1, dtype=torch.bool)
            out.append(torch.cat([f, always], 2).to(torch.uint8).argmax(2))
        return torch.cat(out) if out else torch.zeros(0, self.num_samples, dtype=torch.int64)

    def exit_counts(self, thresholds: torch.Tensor, sample_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``(S, C, E)`` -> (samples leaving at each exit ``(S, M)``, correct among them ``(S, M)``).

        Bit-parallel, as :meth:`DecisionTable.exit_counts`: for each (criterion, exit) the samples with
        ``score > T`` are a suffix of the samples sorted by score, precomputed as bitsets; a threshold is
        a ``searchsorted`` rank; an exit's fire set is the OR over its criteria, ANDed with the samples
        still running. Exact: the same exits as :meth:`exit_indices`.
        """
        t = self._check(thresholds).numpy()
        s_count, c_count, e_count = t.shape
        m = e_count + 1
        counts = np.zeros((s_count, m), dtype=np.int64)
        hits = np.zeros((s_count, m), dtype=np.int64)
        scores = self.scores.numpy()
        correct = (self.pred == self.labels.unsqueeze(1)).numpy()
        for lo in range(0, self.num_samples, sample_chunk):
            sc = scores[lo:lo + sample_chunk]
            cor = correct[lo:lo + sample_chunk]
            n = sc.shape[0]
            words = (n + 63) // 64
            onehot = np.zeros((n, words), dtype=np.uint64)
            onehot[np.arange(n), np.arange(n) // 64] = np.left_shift(np.uint64(1),
                                                                     (np.arange(n) % 64).astype(np.uint64))
            alive = np.tile(_pack(np.ones(n, dtype=bool), words), (s_count, 1))
            for j in range(e_count):
                fire = np.zeros((s_count, words), dtype=np.uint64)
                for c in range(c_count):
                    col = sc[:, c, j]
                    order = np.argsort(col, kind="stable")
                    suffix = np.zeros((n + 1, words), dtype=np.uint64)
                    suffix[:n] = np.bitwise_or.accumulate(onehot[order][::-1], axis=0)[::-1]
                    rank = np.searchsorted(col[order], t[:, c, j], side="right")  # samples with score <= T
                    fire |= suffix[rank]
                fire &= alive
                alive &= ~fire
                counts[:, j] += np.bitwise_count(fire).sum(1, dtype=np.int64)
                hits[:, j] += np.bitwise_count(fire & _pack(cor[:, j], words)).sum(1, dtype=np.int64)
            counts[:, m - 1] += np.bitwise_count(alive).sum(1, dtype=np.int64)
            hits[:, m - 1] += np.bitwise_count(alive & _pack(cor[:, m - 1], words)).sum(1, dtype=np.int64)
        return counts, hits

    def evaluate(self, thresholds: torch.Tensor, costs: CascadeCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, C, E)`` score-space thresholds -> (mean FLOPs ``(S,)``, accuracy ``(S,)``), float64."""
        t = self._check(thresholds)
        counts, hits = self.exit_counts(t)
        per_exit_cost = costs.per_exit(t, self.disable).numpy()
        n = max(1, self.num_samples)
        return (torch.from_numpy((counts * per_exit_cost).sum(1) / n),
                torch.from_numpy((hits.sum(1) / n).astype(np.float64)))

    def evaluate_dense(self, thresholds: torch.Tensor, costs: CascadeCosts, chunk: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`evaluate` from ``(S, N, C, E)`` masks (slower; a reference)."""
        t = self._check(thresholds)
        correct = (self.pred == self.labels.unsqueeze(1))  # (N, M)
        fl, ac = [], []
        for lo in range(0, t.shape[0], chunk):
            tt = t[lo:lo + chunk]
            ex = self.exit_indices(tt)
            fl.append(torch.gather(costs.per_exit(tt, self.disable), 1, ex).mean(1))
            ac.append(correct.gather(1, ex.t()).t().double().mean(1))
        return torch.cat(fl), torch.cat(ac)


def _pack(mask: np.ndarray, words: int) -> np.ndarray:
    """``(n,)`` booleans -> ``(words,)`` uint64 bitset: bit ``i % 64`` of word ``i // 64`` is sample ``i``."""
    padded = np.zeros(words * 64, dtype=bool)
    padded[: mask.shape[0]] = mask
    as_bytes = np.packbits(padded.reshape(words * 8, 8), axis=1, bitorder="little").reshape(words, 8)
    return as_bytes.view("<u8").reshape(words).astype(np.uint64)
