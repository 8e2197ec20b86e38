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

from dataclasses import dataclass, field

import torch

from service.earlyexit.cascade_table import CascadeCosts, CascadeTable
from service.earlyexit.modes import (
    CM_HEAD,
    CRITERIA,
    IC_HEAD,
    MODES,
    RULE_NAMES,
    DecisionMode,
    get_mode,
)

__all__ = ["MODES", "RULE_NAMES", "ICCosts", "ICDecisionTable", "branchynet_fires", "combined_fires",
           "disabled_value", "entropy", "from_score_thresholds", "num_criteria", "sdn_fires", "to_score_thresholds"]


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
    """The user-space threshold that switches an exit off in ``mode`` (1 for probabilities, 0 for entropy;
    its first criterion's for a mode with several)."""
    return get_mode(mode).disabled_user[0]


def num_criteria(mode: str) -> int:
    return get_mode(mode).num_criteria


def to_score_thresholds(mode: str, thresholds: torch.Tensor) -> torch.Tensor:
    """User-space thresholds -> score space ``(S, C, E)`` float32.

    ``cm``/``ic_prob``/``ic_entropy`` take ``(S, E)`` (or ``(E,)``), ``combined`` takes ``(S, 2, E)``
    (or ``(2, E)``) with ``[:, 0]`` the IC and ``[:, 1]`` the class-means thresholds. Entropy thresholds
    are negated (``H < T`` is ``-H > -T``).
    """
    m = get_mode(mode)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    c = m.num_criteria
    if c == 1:
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2:
            raise ValueError(f"{mode} thresholds must be (S, E)")
        t = t.unsqueeze(1)
    else:
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[1] != c:
            rows = ", ".join(f"[:, {i}] {k}" for i, k in enumerate(m.keys or ()))
            raise ValueError(f"{mode} thresholds must be (S, {c}, E): {rows}")
    return m.to_score(t)


def from_score_thresholds(mode: str, score_t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_score_thresholds`: ``(S, C, E)`` -> ``(S, E)`` or ``(S, C, E)``."""
    m = get_mode(mode)
    t = m.from_score(score_t)
    return t[:, 0] if m.num_criteria == 1 else t


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

    def head_cost(self, head: str) -> tuple[float, ...]:
        return self.cm_cost if head == CM_HEAD else self.ic_cost

    def cascade(self, mode: str) -> CascadeCosts:
        """The predictor head paid wherever a criterion is enabled; a criterion on another head adds that head."""
        m = get_mode(mode)
        zeros = tuple(0.0 for _ in self.ic_cost)
        crit = tuple(zeros if CRITERIA[s].head == m.predictor else self.head_cost(CRITERIA[s].head) for s in m.slots)
        return CascadeCosts(self.backbone_cum, self.head_cost(m.predictor), crit)


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
    num_samples: int = field(init=False, repr=False)  # N
    num_exits: int = field(init=False, repr=False)  # M

    def __post_init__(self) -> None:
        n, m = self.ic_prob.shape
        self.num_samples, self.num_exits = int(n), int(m)
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
    def has_cm(self) -> bool:
        """Whether the class-means columns are there (they may be filled in after construction)."""
        return self.cm_prob is not None

    def per_exit_accuracy(self) -> dict[str, list[float]]:
        """``{"ic": (M,) IC accuracy (the network's last), "cm": (E,) nearest-mean accuracy}``."""
        out = {"ic": (self.ic_pred == self.labels.unsqueeze(1)).double().mean(0).tolist()}
        if self.cm_pred is not None:
            out["cm"] = (self.cm_pred == self.labels.unsqueeze(1)).double().mean(0).tolist()
        return out

    def cascade(self, mode: str) -> CascadeTable:
        """The generic cascade that ``mode`` evaluates (scores in score space; see the module docstring)."""
        m = get_mode(mode)
        if m.needs_cm and not self.has_cm:
            raise ValueError(f"mode {mode!r} needs class-means columns (load a bundle)")
        cols = [self._score(s) for s in m.slots]
        scores = cols[0].unsqueeze(1) if len(cols) == 1 else torch.stack(cols, 1)
        return CascadeTable(scores, m.disabled_score, self._pred(m), self.labels)

    def _score(self, slot: int) -> torch.Tensor:
        """``(N, E)`` score column of criterion slot ``slot`` (:data:`~service.earlyexit.modes.CRITERIA`)."""
        e = self.num_exits - 1
        c = CRITERIA[slot]
        if c.head == CM_HEAD:
            assert self.cm_prob is not None
            return self.cm_prob
        return self.ic_prob[:, :e] if c.score == "top" else -self.ic_entropy[:, :e]

    def _pred(self, m: DecisionMode) -> torch.Tensor:
        """``(N, M)`` predictions of ``m``'s predictor head at the early exits, the network's own last."""
        if m.predictor == IC_HEAD:
            return self.ic_pred
        assert self.cm_pred is not None
        return torch.cat([self.cm_pred, self.ic_pred[:, -1:]], 1)

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
        rule = get_mode(mode).rule_labels(fired)
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
