"""Segments: what one ONNX Runtime call computes, and the plan of calls one exit policy makes.

A *segment* is the run of backbone stages from one enabled exit to the next, ending with the outputs of the
heads consulted there (Eq. 3-5 class-means probabilities and/or the internal classifier's softmax) plus the
feature the next segment continues from; the last segment of a network ends with the network head's softmax.
A sample therefore costs one session call per enabled exit it reaches, however many stages lie between.

Keys are general on purpose (multi-network cascades, a later issue): a :class:`SegmentKey` is
``(network, start, end, heads)`` -- the network's id, the first stage run, the exit it stops at (a stage
index, or ``num_exits - 1`` for the network's own head) and the heads evaluated there. A
:class:`SegmentPlan` is an ordered list of :class:`Stop` s; every stop names its network, so a plan may walk
over several networks: a stop whose key starts at stage 0 of a network reads that network's own preprocessed
input (each network has its own preprocessing of the decoded image); otherwise it continues from the
previous stop's feature of the same network. Only single-network plans are built today
(:func:`plan_for`, network :data:`DEFAULT_NETWORK`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.earlyexit.modes import CM_HEAD, IC_HEAD
from service.earlyexit.policy import CM_SLOT, IC_NEGENT_SLOT, IC_TOP_SLOT, ExitPolicy

DEFAULT_NETWORK = "main"
FINAL = "final"  # the network head's softmax ends a segment (class-means / IC heads: modes.HEADS)


@dataclass(frozen=True, order=True)
class SegmentKey:
    """Stages ``start..end`` (inclusive; for ``heads == ("final",)`` ``end`` is the head's exit ``M - 1``
    and stages ``start..M - 2`` run before the head) of ``network``, then ``heads`` at exit ``end``.

    Inputs: ``x (B, *in_shape)`` float32, the dynamic batch axis first. Outputs, in order:
    ``feature (B, *shape_end)`` then ``cm (B, K)`` and/or ``ic (B, K)``; a final segment outputs only
    ``probs (B, K)`` (softmax of the network's logits).
    """

    network: str
    start: int
    end: int
    heads: tuple[str, ...]

    @property
    def final(self) -> bool:
        return self.heads == (FINAL,)

    def output_names(self) -> list[str]:
        return ["probs"] if self.final else ["feature", *self.heads]

    def label(self) -> str:
        return f"{self.network}[{self.start}..{self.end}]+{'+'.join(self.heads) or 'none'}"


@dataclass(frozen=True)
class Stop:
    """One enabled exit on a plan (or the network head, ``key.final``).

    ``thresholds``: ``(T_cm, T_ic_top, T_ic_negent)`` Python floats in score space (Eq. 6-7: a criterion
    fires on ``score > T``; ``T >= 1`` (``>= 0`` for the negative entropy) disables it). ``need_cm`` /
    ``need_ic``: heads computed here (an enabled criterion's head and the predictor's). ``consulted``: head
    FLOPs a sample has spent when it leaves here (this stop included).
    """

    key: SegmentKey
    exit_index: int
    thresholds: tuple[float, float, float]
    need_cm: bool
    need_ic: bool
    consulted: float


@dataclass(frozen=True)
class SegmentPlan:
    """Every call one policy makes, in order; ``stops[-1]`` is the network head. ``consulted_at (M,)``:
    head FLOPs spent by a sample that leaves at exit ``j`` (0 where no stop), as the reference engine sums
    them; ``by_cm``: the class-means head predicts (else the IC)."""

    stops: tuple[Stop, ...]
    consulted_at: tuple[float, ...]
    by_cm: bool
    consulted_table: torch.Tensor = field(init=False, repr=False)  # consulted_at as float64 (M,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "consulted_table", torch.tensor(self.consulted_at, dtype=torch.float64))

    def segment_keys(self) -> list[SegmentKey]:
        return [s.key for s in self.stops]


def plan_for(policy: ExitPolicy, network: str = DEFAULT_NETWORK) -> SegmentPlan:
    """The segments ``policy`` runs: one per exit where any criterion is enabled, then the head."""
    by_cm = policy.predictor == CM_HEAD
    m = policy.num_exits
    stops: list[Stop] = []
    consulted = 0.0
    consulted_at = [0.0] * m
    start = 0
    for j, step in enumerate(policy.plan):
        if step is None:
            continue
        _, t, cost = step
        need_cm = t[CM_SLOT] < 1.0 or by_cm
        need_ic = t[IC_TOP_SLOT] < 1.0 or t[IC_NEGENT_SLOT] < 0.0 or not by_cm
        heads = tuple(h for h, on in ((CM_HEAD, need_cm), (IC_HEAD, need_ic)) if on)
        consulted += cost
        consulted_at[j] = consulted
        stops.append(Stop(SegmentKey(network, start, j, heads), j, t, need_cm, need_ic, consulted))
        start = j + 1
    consulted_at[-1] = consulted
    stops.append(Stop(SegmentKey(network, start, m - 1, (FINAL,)), m - 1, (1.0, 1.0, 0.0), False, False, consulted))
    return SegmentPlan(tuple(stops), tuple(consulted_at), by_cm)
