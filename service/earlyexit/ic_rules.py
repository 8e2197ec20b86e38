"""Exit rules with trained internal classifiers (ICs), alone and combined with class means (E2CM Sec. III-B).

Pure torch/numpy math on cached tables; no network, no disk.

Notation: ``E`` early IC exits (SDN puts six at 15..90 % of the backbone FLOPs) plus the network's own
classifier as exit ``M - 1 = E``, which always accepts. ``K`` classes. At IC exit ``j`` a sample has the
IC's softmax ``q_j`` (top probability ``max q_j``, entropy ``H(q_j) = -sum q log q`` in nats, prediction
``argmax q_j``) and, when a class-means bundle is loaded, the class-means probabilities ``p_j`` (Eq. 5)
at the same backbone exit (top probability ``max p_j``, prediction = nearest class mean).

Rules (all strict, first exit that fires wins, the last exit always accepts with the network's argmax):

* ``cm``         -- class means only at the IC exits: exit when ``max p_j > T_j``; predict the nearest mean.
  ``T_j >= 1`` disables exit ``j`` (nothing is computed there).
* ``ic_prob``    -- SDN: exit when ``max q_j > T_j``; predict ``argmax q_j``. ``T_j >= 1`` disables.
  (SDN's code compares with ``>=`` and one global ``q``; we search one threshold per exit, strict.)
* ``ic_entropy`` -- BranchyNet: exit when ``H(q_j) < T_j``, thresholds in ``[0, log K]``; predict
  ``argmax q_j``. ``T_j <= 0`` disables (an entropy is never negative).
* ``combined``   -- E2CM + SDN: a sample goes on only if *both* the IC and class means approve, i.e. it
  exits when ``max q_j > T^ic_j`` **or** ``max p_j > T^cm_j``, and it always exits with the IC's
  prediction. Two threshold vectors per candidate, ``T[:, 0] = T^ic`` and ``T[:, 1] = T^cm``. If either
  is enabled at ``j`` the IC is computed (it gives the prediction); ``T^ic_j >= 1`` only stops the IC from
  voting for an exit.

FLOPs (2 per multiply-add) of a sample leaving at exit ``e``: cumulative backbone FLOPs up to ``e`` plus,
for every exit ``j <= e`` that is enabled, the heads consulted there (the IC, the class-means head, or
both). A disabled exit costs nothing.

Everything reduces to one generic object, :class:`CascadeTable`: per early exit, ``C`` *criteria*, each a
score column compared with its own threshold (``score > T`` fires); an exit fires when any of its criteria
fires. ``ic_prob`` and ``cm`` use the top probability as score, ``ic_entropy`` uses ``-H`` (``H < T`` is
``-H > -T``), ``combined`` has two criteria. Thresholds live in *score space* inside this module's search
and are converted back to each rule's own convention at the boundary (:func:`to_score_thresholds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from service.earlyexit.decision_table import _pack
from service.earlyexit.hull import upper_hull

MODES = ("cm", "ic_prob", "ic_entropy", "combined")
RULE_NAMES = ("ic", "cm", "ic+cm", "final")  # what fired, reported per prediction


# ---------------------------------------------------------------------------------------------- the rules


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` probabilities -> ``(...)`` entropy in nats, ``>= 0`` (``0 log 0 = 0``)."""
    return torch.special.entr(probs).sum(-1).clamp_min(0.0)


def sdn_fires(top_prob: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """SDN rule: ``max q > T`` (strict); ``T >= 1`` never fires. Broadcasts."""
    t = torch.as_tensor(threshold, dtype=top_prob.dtype)
    return (top_prob > t) & (t < 1.0)


def branchynet_fires(ent: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """BranchyNet rule: ``H(q) < T`` (strict); ``T <= 0`` never fires. Broadcasts."""
    t = torch.as_tensor(threshold, dtype=ent.dtype)
    return (ent < t) & (t > 0.0)


def combined_fires(ic_top: torch.Tensor, cm_top: torch.Tensor, t_ic: float | torch.Tensor,
                   t_cm: float | torch.Tensor) -> torch.Tensor:
    """Combined rule: go on only if both approve, i.e. fire when ``max q > T^ic`` or ``max p > T^cm``."""
    return sdn_fires(ic_top, t_ic) | sdn_fires(cm_top, t_cm)


def disabled_value(mode: str) -> float:
    """The user-space threshold that switches an exit off in ``mode`` (1 for probabilities, 0 for entropy)."""
    _check_mode(mode)
    return 0.0 if mode == "ic_entropy" else 1.0


def num_criteria(mode: str) -> int:
    _check_mode(mode)
    return 2 if mode == "combined" else 1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown decision mode {mode!r}; use one of {MODES}")


def to_score_thresholds(mode: str, thresholds: torch.Tensor) -> torch.Tensor:
    """User-space thresholds -> score space ``(S, C, E)`` float32.

    ``cm``/``ic_prob``/``ic_entropy`` take ``(S, E)`` (or ``(E,)``), ``combined`` takes ``(S, 2, E)``
    (or ``(2, E)``) with ``[:, 0]`` the IC and ``[:, 1]`` the class-means thresholds. Entropy thresholds
    are negated (``H < T`` is ``-H > -T``).
    """
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    c = num_criteria(mode)
    if c == 1:
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2:
            raise ValueError(f"{mode} thresholds must be (S, E)")
        t = t.unsqueeze(1)
    else:
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[1] != 2:
            raise ValueError("combined thresholds must be (S, 2, E): [:, 0] IC, [:, 1] class means")
    return -t if mode == "ic_entropy" else t


def from_score_thresholds(mode: str, score_t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_score_thresholds`: ``(S, C, E)`` -> ``(S, E)`` or ``(S, 2, E)``."""
    t = -score_t if mode == "ic_entropy" else score_t
    return t[:, 0] if num_criteria(mode) == 1 else t


# ----------------------------------------------------------------------------------- the generic cascade


@dataclass
class CascadeCosts:
    """FLOPs of a cascade whose exits may consult several heads.

    ``backbone_cum (M,)``: backbone FLOPs up to each exit (the last: the full network).
    ``base_cost (E,)``: the predicting head at exit ``j``, paid when any criterion is enabled there.
    ``criterion_cost (C, E)``: extra cost of criterion ``c`` at ``j``, paid when that criterion is enabled.
    """

    backbone_cum: tuple[float, ...]
    base_cost: tuple[float, ...]
    criterion_cost: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        e = len(self.backbone_cum) - 1
        if len(self.base_cost) != e or any(len(r) != e for r in self.criterion_cost):
            raise ValueError("base_cost and every criterion_cost row need M - 1 entries")

    @property
    def full(self) -> float:
        return float(self.backbone_cum[-1])

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
        return torch.tensor(self.backbone_cum, dtype=torch.float64).unsqueeze(0) + consulted


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

    def __post_init__(self) -> None:
        if self.scores.ndim != 3 or self.pred.ndim != 2:
            raise ValueError("scores must be (N, C, E) and pred (N, E + 1)")
        n, c, e = self.scores.shape
        if self.pred.shape != (n, e + 1) or self.labels.shape != (n,):
            raise ValueError("pred must be (N, E + 1) and labels (N,)")
        if len(self.disable) != c:
            raise ValueError("one disable value per criterion")
        for ci, d in enumerate(self.disable):
            if n and float(self.scores[:, ci].max()) > d:
                raise ValueError(f"criterion {ci} has scores above its disable value {d}")

    @property
    def num_samples(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_criteria(self) -> int:
        return int(self.scores.shape[1])

    @property
    def num_exits(self) -> int:
        return int(self.scores.shape[2]) + 1

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


# ------------------------------------------------------------------------- the IC decision table and costs


@dataclass
class ICCosts:
    """``backbone_cum (M,)``: backbone FLOPs up to each IC exit and, last, the full network;
    ``ic_cost (E,)``: one IC's FLOPs; ``cm_cost (E,)``: the class-means head's FLOPs at the same exit."""

    backbone_cum: tuple[float, ...]
    ic_cost: tuple[float, ...]
    cm_cost: tuple[float, ...]

    def __post_init__(self) -> None:
        e = len(self.backbone_cum) - 1
        if len(self.ic_cost) != e or len(self.cm_cost) != e:
            raise ValueError("ic_cost and cm_cost need one entry per IC exit")

    @property
    def full(self) -> float:
        return float(self.backbone_cum[-1])

    def cascade(self, mode: str) -> CascadeCosts:
        _check_mode(mode)
        zeros = tuple(0.0 for _ in self.ic_cost)
        if mode == "cm":
            return CascadeCosts(self.backbone_cum, self.cm_cost, (zeros,))
        if mode == "combined":
            return CascadeCosts(self.backbone_cum, self.ic_cost, (zeros, self.cm_cost))
        return CascadeCosts(self.backbone_cum, self.ic_cost, (zeros,))


@dataclass
class ICDecisionTable:
    """Per sample and IC exit, everything the four rules read.

    ``ic_prob (N, M)``, ``ic_entropy (N, M)`` float32 and ``ic_pred (N, M)`` int64: the IC softmax's top
    probability, entropy (nats) and argmax at IC exits ``0..E-1``, and the network's own softmax in column
    ``M - 1 = E``. ``cm_prob (N, E)`` float32 and ``cm_pred (N, E)`` int64: the class-means top probability
    and nearest mean at the same backbone exits (``None`` without a bundle). ``labels (N,)``.
    """

    ic_prob: torch.Tensor
    ic_entropy: torch.Tensor
    ic_pred: torch.Tensor
    labels: torch.Tensor
    cm_prob: torch.Tensor | None = None
    cm_pred: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, m = self.ic_prob.shape
        if self.ic_entropy.shape != (n, m) or self.ic_pred.shape != (n, m) or self.labels.shape != (n,):
            raise ValueError("ic_prob, ic_entropy, ic_pred must be (N, M) and labels (N,)")
        if (self.cm_prob is None) != (self.cm_pred is None):
            raise ValueError("give both cm_prob and cm_pred, or neither")
        if self.cm_prob is not None and (self.cm_prob.shape != (n, m - 1) or self.cm_pred.shape != (n, m - 1)):
            raise ValueError("cm_prob and cm_pred must be (N, M - 1)")

    @classmethod
    def from_outputs(cls, ic_probs: list[torch.Tensor], final_probs: torch.Tensor, labels: torch.Tensor,
                     cm_probs: list[torch.Tensor] | None = None) -> ICDecisionTable:
        """From softmax outputs: ``E`` IC ``(N, K)``, the network's ``(N, K)``, optional ``E`` class-means
        ``(N, K)`` probabilities."""
        allp = [*ic_probs, final_probs]
        top, pred = zip(*(p.max(1) for p in allp), strict=True)
        ent = [entropy(p.float()) for p in allp]
        cm_top = cm_pred = None
        if cm_probs is not None:
            ct, cp = zip(*(p.max(1) for p in cm_probs), strict=True)
            cm_top, cm_pred = torch.stack(ct, 1).float(), torch.stack(cp, 1)
        return cls(torch.stack(top, 1).float(), torch.stack(ent, 1).float(), torch.stack(pred, 1), labels,
                   cm_top, cm_pred)

    @property
    def num_samples(self) -> int:
        return int(self.ic_prob.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.ic_prob.shape[1])

    @property
    def has_cm(self) -> bool:
        return self.cm_prob is not None

    def per_exit_accuracy(self) -> dict[str, list[float]]:
        """``{"ic": (M,) IC accuracy (the network's last), "cm": (E,) nearest-mean accuracy}``."""
        out = {"ic": (self.ic_pred == self.labels.unsqueeze(1)).double().mean(0).tolist()}
        if self.cm_pred is not None:
            out["cm"] = (self.cm_pred == self.labels.unsqueeze(1)).double().mean(0).tolist()
        return out

    def cascade(self, mode: str) -> CascadeTable:
        """The generic cascade that ``mode`` evaluates (scores in score space; see the module docstring)."""
        _check_mode(mode)
        e = self.num_exits - 1
        if mode in ("cm", "combined") and not self.has_cm:
            raise ValueError(f"mode {mode!r} needs class-means columns (load a bundle)")
        if mode == "cm":
            assert self.cm_prob is not None and self.cm_pred is not None
            pred = torch.cat([self.cm_pred, self.ic_pred[:, -1:]], 1)
            return CascadeTable(self.cm_prob.unsqueeze(1), (1.0,), pred, self.labels)
        if mode == "ic_prob":
            return CascadeTable(self.ic_prob[:, :e].unsqueeze(1), (1.0,), self.ic_pred, self.labels)
        if mode == "ic_entropy":
            return CascadeTable((-self.ic_entropy[:, :e]).unsqueeze(1), (0.0,), self.ic_pred, self.labels)
        assert self.cm_prob is not None
        return CascadeTable(torch.stack([self.ic_prob[:, :e], self.cm_prob], 1), (1.0, 1.0), self.ic_pred,
                            self.labels)

    def evaluate(self, mode: str, thresholds: torch.Tensor, costs: ICCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """User-space thresholds (``(S, E)``, or ``(S, 2, E)`` for ``combined``) -> (mean FLOPs, accuracy)."""
        return self.cascade(mode).evaluate(to_score_thresholds(mode, thresholds), costs.cascade(mode))

    def exit_indices(self, mode: str, thresholds: torch.Tensor) -> torch.Tensor:
        """User-space thresholds -> ``(S, N)`` IC exit index (``E``: the network's own classifier)."""
        return self.cascade(mode).exit_indices(to_score_thresholds(mode, thresholds))

    def decide(self, mode: str, thresholds: torch.Tensor, costs: ICCosts) -> dict[str, torch.Tensor]:
        """One threshold vector -> per sample ``exit (N,)``, ``pred (N,)``, ``flops (N,)`` float64 and
        ``rule (N,)`` int64 indexing :data:`RULE_NAMES` (which criterion fired; ``final`` when none did)."""
        cas = self.cascade(mode)
        t = to_score_thresholds(mode, thresholds)
        if t.shape[0] != 1:
            raise ValueError("decide takes one threshold vector")
        ex = cas.exit_indices(t)[0]
        n = cas.num_samples
        rows = torch.arange(n)
        flops = costs.cascade(mode).per_exit(t, cas.disable)[0][ex]
        early = ex < cas.num_exits - 1
        exc = ex.clamp_max(cas.num_exits - 2)
        fired = cas.fires(t)[0][rows, :, exc] & early.unsqueeze(1)  # (N, C)
        rule = torch.full((n,), RULE_NAMES.index("final"), dtype=torch.int64)
        if mode == "cm":
            rule[fired[:, 0]] = RULE_NAMES.index("cm")
        elif mode == "combined":
            rule[fired[:, 0]] = RULE_NAMES.index("ic")
            rule[fired[:, 1]] = RULE_NAMES.index("cm")
            rule[fired[:, 0] & fired[:, 1]] = RULE_NAMES.index("ic+cm")
        else:
            rule[fired[:, 0]] = RULE_NAMES.index("ic")
        return {"exit": ex, "pred": cas.pred[rows, ex], "flops": flops, "rule": rule}

    def evaluate_sdn_fallback(self, thresholds: torch.Tensor, costs: ICCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """SDN's own ``early_exit``: ``ic_prob`` rule, but a sample that no IC lets out is labelled by the
        most confident output among the *consulted* ICs and the final classifier (not simply the final).
        ``(S, E)`` -> (mean FLOPs, accuracy); FLOPs as for ``ic_prob``."""
        t = to_score_thresholds("ic_prob", thresholds)
        cas = self.cascade("ic_prob")
        ex = cas.exit_indices(t)  # (S, N)
        e = self.num_exits - 1
        flops = torch.gather(costs.cascade("ic_prob").per_exit(t, cas.disable), 1, ex).mean(1)
        enabled = t[:, 0] < 1.0  # (S, E)
        conf = torch.cat([self.ic_prob[:, :e].unsqueeze(0).expand(t.shape[0], -1, -1)
                          .masked_fill(~enabled.unsqueeze(1), -1.0), self.ic_prob[:, e:].unsqueeze(0)
                          .expand(t.shape[0], -1, -1)], 2)  # (S, N, M)
        best = conf.argmax(2)  # first maximum
        chosen = torch.where(ex == e, best, ex)
        pred = torch.gather(self.ic_pred, 1, chosen.t()).t()  # (S, N): ic_pred[n, chosen[s, n]]
        acc = (pred == self.labels.unsqueeze(0)).double().mean(1)
        return flops, acc


# -------------------------------------------------------------------------------------------- the search


@dataclass
class CascadeSearch:
    """``thresholds`` in the rule's own convention (``(S, E)`` or ``(S, 2, E)``), ``flops (S,)``,
    ``accuracy (S,)``; ``hull``: indices of the upper-hull vertices by FLOPs. Row 0 is the full network."""

    mode: str
    thresholds: torch.Tensor
    flops: torch.Tensor
    accuracy: torch.Tensor
    hull: list[int]


def _grids(cas: CascadeTable, levels: np.ndarray) -> np.ndarray:
    """``(L, C, E)`` float32 quantiles of every score column."""
    return np.quantile(cas.scores.double().numpy(), levels, axis=0).astype(np.float32)


def _below(v: np.ndarray) -> np.ndarray:
    """The float32 just below ``v``: ``score > T`` then admits the sample sitting at ``v``."""
    v = v.astype(np.float32)
    return np.nextafter(v, np.float32(-np.inf)).astype(np.float32)


def random_score_vectors(cas: CascadeTable, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``(samples, C, E)`` score-space thresholds: each criterion at each exit is switched on with a
    per-vector probability in ``[0.02, 0.6]``; an enabled one sits at a random quantile of its scores."""
    c, e = cas.num_criteria, cas.num_exits - 1
    levels = np.linspace(0.0, 1.0, 201)
    grid = _grids(cas, levels)
    pick = rng.integers(0, len(levels), size=(samples, c, e))
    values = _below(grid[pick, np.arange(c)[None, :, None], np.arange(e)[None, None, :]])
    p_enable = rng.uniform(0.02, 0.6, size=(samples, 1, 1))
    enabled = rng.random((samples, c, e)) < p_enable
    dis = np.array(cas.disable, dtype=np.float32).reshape(1, c, 1)
    return np.where(enabled, values, np.broadcast_to(dis, values.shape)).astype(np.float32)


def _mutate(base: np.ndarray, cas: CascadeTable, per_vertex: int, rng: np.random.Generator) -> np.ndarray:
    """Local moves around hull vertices: switch a criterion off, re-draw it, or step it a few quantiles."""
    c, e = cas.num_criteria, cas.num_exits - 1
    levels = np.linspace(0.0, 1.0, 401)
    grid = _grids(cas, levels)  # (L, C, E)
    dis = np.array(cas.disable, dtype=np.float32)
    out = np.repeat(base, per_vertex, axis=0).astype(np.float32)
    n = out.shape[0]
    rows = np.arange(n)
    for _ in range(2):
        ci = rng.integers(0, c, size=n)
        ej = rng.integers(0, e, size=n)
        cur = out[rows, ci, ej]
        col = grid[:, ci, ej]  # (L, n)
        rank = (col < cur[None, :]).sum(0)
        step = rng.integers(-8, 9, size=n)
        stepped = _below(col[np.clip(rank + step, 0, len(levels) - 1), rows])
        redraw = _below(col[rng.integers(0, len(levels), size=n), rows])
        action = rng.random(n)
        is_off = cur >= dis[ci]
        new = np.where(action < 0.2, dis[ci], np.where((action < 0.45) | is_off, redraw, stepped))
        out[rows, ci, ej] = new
    return out


def search_cascade(cas: CascadeTable, costs: CascadeCosts, samples: int = 10_000, seed: int = 0,
                   refine_rounds: int = 6, extra: np.ndarray | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Random quantile vectors (+ ``extra`` score-space candidates ``(X, C, E)``), then ``refine_rounds``
    of local mutation around the hull. Returns score-space ``(S, C, E)`` thresholds, FLOPs, accuracy and
    the hull; row 0 is the all-disabled vector (the full network)."""
    rng = np.random.default_rng(seed)
    c, e = cas.num_criteria, cas.num_exits - 1
    full = np.broadcast_to(np.array(cas.disable, dtype=np.float32).reshape(1, c, 1), (1, c, e))
    parts = [full, random_score_vectors(cas, samples, rng)]
    if extra is not None and len(extra):
        parts.append(np.asarray(extra, dtype=np.float32).reshape(-1, c, e))
    cand = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))
    flops, acc = cas.evaluate(cand, costs)
    per_vertex = max(8, samples // 40)
    for _ in range(refine_rounds):
        hull = upper_hull(flops.numpy(), acc.numpy())
        more = torch.from_numpy(_mutate(cand[hull].numpy(), cas, per_vertex, rng))
        f2, a2 = cas.evaluate(more, costs)
        cand, flops, acc = torch.cat([cand, more]), torch.cat([flops, f2]), torch.cat([acc, a2])
    return cand, flops, acc, upper_hull(flops.numpy(), acc.numpy())


def search_mode(table: ICDecisionTable, costs: ICCosts, mode: str, samples: int = 10_000, seed: int = 0,
                refine_rounds: int = 6, extra: torch.Tensor | None = None) -> CascadeSearch:
    """Search thresholds for one rule on a selection table; ``extra``: user-space candidates to include.

    For ``combined``, pass the SDN (``ic_prob``) hull as ``extra`` with the class-means thresholds set to 1
    (see :func:`combined_seeds`): the combined rule then contains SDN's operating points, and its hull can
    only be at least as good on the selection data.
    """
    cas = table.cascade(mode)
    x = to_score_thresholds(mode, extra).numpy() if extra is not None and len(extra) else None
    cand, flops, acc, hull = search_cascade(cas, costs.cascade(mode), samples, seed, refine_rounds, x)
    return CascadeSearch(mode, from_score_thresholds(mode, cand), flops, acc, hull)


def combined_seeds(ic_thresholds: torch.Tensor | None = None, cm_thresholds: torch.Tensor | None = None,
                   num_early: int | None = None) -> torch.Tensor:
    """User-space ``(X, 2, E)`` combined candidates from SDN vectors ``(A, E)`` (class means off) and
    class-means vectors ``(B, E)`` at the IC exits (the IC still predicts, but never votes)."""
    parts = []
    if ic_thresholds is not None and len(ic_thresholds):
        t = torch.as_tensor(ic_thresholds, dtype=torch.float32)
        parts.append(torch.stack([t, torch.ones_like(t)], 1))
    if cm_thresholds is not None and len(cm_thresholds):
        t = torch.as_tensor(cm_thresholds, dtype=torch.float32)
        parts.append(torch.stack([torch.ones_like(t), t], 1))
    if not parts:
        return torch.zeros(0, 2, num_early or 0)
    return torch.cat(parts)


def max_entropy(num_classes: int) -> float:
    """``log K``: the top of BranchyNet's threshold range (the uniform distribution's entropy)."""
    return math.log(num_classes)
