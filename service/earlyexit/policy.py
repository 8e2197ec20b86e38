"""The exit policy: every decision mode as data for one cascade runner.

At backbone exit ``j`` (``j < M - 1``; exit ``M - 1`` is the network's own classifier, which always
accepts) a sample may consult two *heads*: the class-means head (Eq. 2-5, probabilities ``p_j``) and an
internal classifier (IC, softmax ``q_j``). Three *criteria* read them, each a score compared with its own
threshold, strictly (``score > T`` fires):

=====  =========  ===================  ===================  =====================================
slot   head       score                never fires when     rule label
=====  =========  ===================  ===================  =====================================
0      ``cm``     ``max_k p_j``        ``T >= 1``           ``cm``
1      ``ic``     ``max_k q_j``        ``T >= 1``           ``ic``
2      ``ic``     ``-H(q_j)`` (nats)   ``T >= 0``           ``ic``
=====  =========  ===================  ===================  =====================================

A sample leaves at the first exit where any criterion fires, with the *predictor* head's argmax (the
class-means head or the IC; its probabilities and top probability are reported). Cost at an exit where
some criterion is enabled: the predictor head plus the head of every enabled criterion (each head once);
an exit with no enabled criterion costs nothing and computes nothing.

An :class:`ExitPolicy` is one profile compiled to this form: ``thresholds (3, M - 1)`` in score space,
the predictor, and the FLOPs table its offline profile was costed with. The four decision modes are just
policies:

* ``cm`` (the bundle's profiles, every exit; or an IC set's, at the IC exits): slot 0, predictor ``cm``;
* ``ic_prob`` (SDN): slot 1, predictor ``ic``; ``ic_entropy`` (BranchyNet, ``H < t`` is ``-H > -t``):
  slot 2, predictor ``ic``;
* ``combined`` (E2CM + SDN): slots 0 and 1 (it goes on only if both approve), predictor ``ic``.

The slots and the modes are one table, :mod:`service.earlyexit.modes`; this module only reads it. The offline
evaluation of the same rules is :class:`~service.earlyexit.cascade_table.CascadeTable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from service.earlyexit.costs import ExitCosts
from service.earlyexit.ic_rules import ICCosts
from service.earlyexit.modes import (
    BUNDLE_MODE,
    CM_SLOT,
    CRITERIA,
    DISABLED,
    FINAL_RULE,
    HEADS,
    IC_NEGENT_SLOT,
    IC_TOP_SLOT,
    SLOTS_OF_HEAD,
    get_mode,
    is_mode,
    rule_index,
)

PREDICTORS = HEADS

__all__ = ["CM_SLOT", "CRITERIA", "DISABLED", "FINAL_RULE", "IC_NEGENT_SLOT", "IC_TOP_SLOT", "PREDICTORS",
           "ExitPolicy", "class_means_policy", "heads_consulted", "ic_policy", "rule_index"]


@dataclass(frozen=True, eq=False)
class ExitPolicy:
    """One profile as the cascade runner reads it.

    ``thresholds (3, M - 1)`` float32 in score space (:data:`CRITERIA`); ``predictor``: ``"cm"`` or ``"ic"``;
    ``head_cost (2, M - 1)`` float64 FLOPs of consulting the class-means head (row 0) and the IC (row 1)
    at each exit; ``backbone_cum (M,)`` float64 backbone FLOPs up to each exit (the last: the full
    network). ``mode`` is the decision mode it was searched in (:mod:`service.earlyexit.modes`).
    ``heads_at``: per exit, the heads consulted there (in :data:`~service.earlyexit.modes.HEADS` order; empty
    where no criterion is enabled): the predictor's and those of the enabled criteria.
    """

    name: str
    mode: str
    predictor: str
    thresholds: torch.Tensor = field(repr=False)
    head_cost: torch.Tensor = field(repr=False)
    backbone_cum: torch.Tensor = field(repr=False)
    plan: tuple[tuple[int, tuple[float, float, float], float] | None, ...] = field(init=False, repr=False)
    cum: tuple[float, ...] = field(init=False, repr=False)  # backbone_cum as Python floats
    heads_at: tuple[tuple[str, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m1 = self.backbone_cum.shape[0] - 1
        if self.thresholds.shape != (len(CRITERIA), m1) or self.head_cost.shape != (2, m1):
            raise ValueError(f"thresholds must be (3, {m1}) and head_cost (2, {m1})")
        if self.predictor not in PREDICTORS or not is_mode(self.mode):
            raise ValueError(f"unknown predictor {self.predictor!r} or mode {self.mode!r}")
        enabled = self.enabled().tolist()
        heads_at = tuple(heads_consulted([enabled[c][j] for c in range(len(CRITERIA))], self.predictor)
                         for j in range(m1))
        object.__setattr__(self, "heads_at", heads_at)
        object.__setattr__(self, "plan", self._compile())
        object.__setattr__(self, "cum", tuple(self.backbone_cum.tolist()))

    def _compile(self) -> tuple[tuple[int, tuple[float, float, float], float] | None, ...]:
        """Per exit, Python scalars for the batch-1 path: ``None`` where nothing is enabled, else
        ``(j, (T_cm, T_ic_top, T_ic_negent), FLOPs of the heads consulted there)``."""
        t = self.thresholds.tolist()
        cost = self.head_cost.tolist()
        plan: list[tuple[int, tuple[float, float, float], float] | None] = []
        for j, heads in enumerate(self.heads_at):
            if not heads:
                plan.append(None)
                continue
            paid = cost[0][j] * (HEADS[0] in heads) + cost[1][j] * (HEADS[1] in heads)
            plan.append((j, (t[0][j], t[1][j], t[2][j]), paid))
        return tuple(plan)

    @property
    def num_exits(self) -> int:
        return int(self.backbone_cum.shape[0])

    def enabled(self) -> torch.Tensor:
        """``(3, M - 1)`` booleans: which criteria can fire at which exit."""
        return self.thresholds < torch.tensor(DISABLED).unsqueeze(1)

    def flops_at(self, exit_index: int) -> float:
        """FLOPs of a sample that leaves at ``exit_index``: backbone plus every head consulted on the way."""
        consulted = sum(p[2] for p in self.plan[:exit_index + 1] if p is not None)
        return self.cum[exit_index] + consulted


def heads_consulted(on: Sequence[bool], predictor: str) -> tuple[str, ...]:
    """The heads consulted at an exit whose criterion slots are enabled as ``on`` (none when no slot is)."""
    if not any(on):
        return ()
    return tuple(h for h in HEADS if h == predictor or any(on[s] for s in SLOTS_OF_HEAD[h]))


def _policy(name: str, mode: str, predictor: str, slots: dict[int, torch.Tensor], exits: Sequence[int],
            cm_cost: Sequence[float], ic_cost: Sequence[float], backbone_cum: Sequence[float]) -> ExitPolicy:
    m1 = len(backbone_cum) - 1
    t = torch.tensor(DISABLED, dtype=torch.float32).unsqueeze(1).repeat(1, m1)
    cost = torch.zeros(2, m1, dtype=torch.float64)
    idx = torch.tensor(list(exits), dtype=torch.int64)
    for slot, values in slots.items():
        t[slot, idx] = values.to(torch.float32)
    cost[0, idx] = torch.tensor(list(cm_cost), dtype=torch.float64)
    cost[1, idx] = torch.tensor(list(ic_cost), dtype=torch.float64)
    return ExitPolicy(name, mode, predictor, t, cost, torch.tensor(list(backbone_cum), dtype=torch.float64))


def class_means_policy(name: str, thresholds: torch.Tensor | Sequence[float], costs: ExitCosts) -> ExitPolicy:
    """A bundle profile: ``(M - 1,)`` top-probability thresholds at every exit (``>= 1`` off)."""
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    if t.shape != (costs.num_exits - 1,):
        raise ValueError(f"thresholds must be ({costs.num_exits - 1},)")
    m1 = costs.num_exits - 1
    m = get_mode(BUNDLE_MODE)
    return _policy(name, m.name, m.predictor, {m.slots[0]: t}, range(m1), costs.head_cost, [0.0] * m1,
                   costs.backbone_cum)


def ic_policy(name: str, mode: str, thresholds: torch.Tensor | Sequence, exits: Sequence[int], costs: ICCosts,
              backbone_cum: Sequence[float]) -> ExitPolicy:
    """A profile of an IC set in its own units: ``(E,)`` thresholds at the IC ``exits`` (``(2, E)``
    ``[T^ic, T^cm]`` for ``combined``; entropies for ``ic_entropy``). ``costs`` give the IC and class-means
    heads' FLOPs and the backbone's at the IC exits; ``backbone_cum (M,)`` fills the other exits."""
    m = get_mode(mode)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    e = len(exits)
    if t.shape != m.user_shape(e):
        raise ValueError(f"{mode} thresholds must be {m.threshold_shape}")
    score = m.to_score(t.reshape(1, m.num_criteria, e))[0]
    slots = {s: score[i] for i, s in enumerate(m.slots)}
    cum = list(backbone_cum)
    for i, x in enumerate(exits):
        cum[x] = costs.backbone_cum[i]
    cum[-1] = costs.backbone_cum[-1]
    return _policy(name, mode, m.predictor, slots, exits, costs.cm_cost, costs.ic_cost, cum)
