"""The time axis: what exiting at each exit costs in measured milliseconds, and what a profile costs.

FLOPs are the paper's machine-independent measure; users pay in time. On the machine that serves, the
engine measures (at batch size ``b``, per sample):

* ``stage_ms (M,)``: running backbone stage ``j`` (the stem, each residual block; the last entry is the last
  block plus the network's own classifier), inside a segment;
* ``head_ms (M-1,)``: the fused class-means head at exit ``j`` (pooling, projection, distances, softmax:
  Eq. 3-5);
* ``call_ms``: the fixed cost of one engine call (a compiled segment: input/output binding, dispatch).

A sample runs one segment per enabled exit it reaches (the stages from the previous enabled exit up to this
one, ending with this exit's head) and, when no exit fires, one more segment to the network's classifier.
So its time is additive exactly like its FLOPs (:class:`~service.earlyexit.costs.ExitCosts`):

    time(e) = sum_{j <= e} stage_ms[j] + sum_{j <= e, j enabled} (head_ms[j] + call_ms)   (e < M - 1)
    time(M - 1) = sum_j stage_ms[j] + sum_{j enabled} (head_ms[j] + call_ms) + call_ms

which is :class:`ExitCosts` with ``backbone_cum = cumsum(stage_ms)`` (plus ``call_ms`` at the last exit) and
``head_cost = head_ms + call_ms``. Everything that takes costs (the threshold search, the hull, the decision
table's evaluation) therefore takes time costs unchanged. A profile's expected time per sample is
``sum_e share_e * time(e)`` with ``share (M,)`` the fraction of samples leaving at each exit (measured on the
selection split, Eq. 6-7); a time-shared mix of two profiles costs the convex mix of their times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.earlyexit.costs import ExitCosts
from service.earlyexit.hull import Operating, Profile, TargetUnreachable, select_by_target, upper_hull


@dataclass(frozen=True)
class TimeTable:
    """Measured per-sample milliseconds at one batch size (see the module docstring)."""

    batch_size: int
    stage_ms: tuple[float, ...]
    head_ms: tuple[float, ...]
    call_ms: float

    def __post_init__(self) -> None:
        if len(self.head_ms) != len(self.stage_ms) - 1:
            raise ValueError("head_ms must have one entry fewer than stage_ms")
        if min((*self.stage_ms, *self.head_ms, self.call_ms)) < 0:
            raise ValueError("measured times must be >= 0")

    @property
    def num_exits(self) -> int:
        return len(self.stage_ms)

    @property
    def full_ms(self) -> float:
        """The whole network in one call, no exit consulted."""
        return float(sum(self.stage_ms) + self.call_ms)

    def exit_costs(self) -> ExitCosts:
        """This table as additive per-exit costs, in milliseconds (module docstring)."""
        cum = np.cumsum(np.asarray(self.stage_ms, dtype=np.float64))
        cum[-1] += self.call_ms
        return ExitCosts(tuple(float(c) for c in cum), tuple(float(h) + self.call_ms for h in self.head_ms))

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "stage_ms": [round(x, 6) for x in self.stage_ms],
                "head_ms": [round(x, 6) for x in self.head_ms], "call_ms": round(self.call_ms, 6),
                "full_ms": round(self.full_ms, 6)}

    @classmethod
    def from_json(cls, obj: dict) -> TimeTable:
        return cls(int(obj["batch_size"]), tuple(float(x) for x in obj["stage_ms"]),
                   tuple(float(x) for x in obj["head_ms"]), float(obj["call_ms"]))


@dataclass(frozen=True)
class CascadeTimeTable:
    """A cascade of networks' time axis at one batch size: each member's :class:`TimeTable`, joined exactly as
    their FLOPs are (:func:`~service.earlyexit.model_cascade.join_costs`: members in sequence, the hand-over at
    a member's classifier free, a member with no enabled exit not run)."""

    members: tuple[TimeTable, ...]

    def __post_init__(self) -> None:
        if len({t.batch_size for t in self.members}) != 1:
            raise ValueError("the members' tables must be for one batch size")

    @property
    def batch_size(self) -> int:
        return self.members[0].batch_size

    @property
    def num_exits(self) -> int:
        return sum(t.num_exits for t in self.members)

    def exit_costs(self) -> ExitCosts:
        from service.earlyexit.model_cascade import join_costs

        return join_costs([t.exit_costs() for t in self.members])

    @property
    def full_ms(self) -> float:
        """The last member alone (every exit off)."""
        return float(self.exit_costs().full)

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "members": [t.to_json() for t in self.members],
                "full_ms": round(self.full_ms, 6)}


def decompose(single_stage_ms: Sequence[float], with_head_ms: Sequence[float], whole_ms: float,
              batch_size: int) -> TimeTable:
    """A :class:`TimeTable` from three measurements (per-sample milliseconds at ``batch_size``):

    * ``single_stage_ms (M,)``: one call running stage ``j`` alone (the last: last block + classifier);
    * ``with_head_ms (M-1,)``: one call running stage ``j`` and the class-means head at exit ``j``;
    * ``whole_ms``: one call running the whole network.

    The per-call cost is what ``M`` separate calls cost beyond one: ``call = (sum single - whole) / (M - 1)``
    (clamped at 0); ``stage_ms[j] = single[j] - call``; ``head_ms[j] = with_head[j] - single[j]`` (clamped at
    0: a head cheaper than the timer's noise costs nothing).
    """
    single = np.asarray(single_stage_ms, dtype=np.float64)
    heads = np.asarray(with_head_ms, dtype=np.float64)
    m = single.shape[0]
    if heads.shape != (m - 1,) or m < 2:
        raise ValueError("need M >= 2 single-stage times and M - 1 times with heads")
    call = max(0.0, float(single.sum() - whole_ms) / (m - 1))
    stage = np.maximum(single - call, 0.0)
    head = np.maximum(heads - single[:-1], 0.0)
    return TimeTable(batch_size, tuple(stage.tolist()), tuple(head.tolist()), call)


def expected_ms(share: torch.Tensor | Sequence[float], thresholds: torch.Tensor | Sequence[float],
                table: TimeTable | CascadeTimeTable) -> float:
    """Expected milliseconds per sample of a class-means profile: ``share (M,)`` of samples leaving at each
    exit (sums to 1), ``thresholds (M-1,)`` (``>= 1``: disabled, costs nothing)."""
    t = torch.as_tensor(thresholds, dtype=torch.float32).view(1, -1)
    per_exit = table.exit_costs().per_exit(t)[0]  # (M,) time of a sample leaving at each exit
    s = torch.as_tensor(share, dtype=torch.float64)
    if s.shape != per_exit.shape:
        raise ValueError(f"share must be ({per_exit.shape[0]},)")
    return float((s * per_exit).sum())


def time_hull(profiles: Sequence[Profile], time_fraction: dict[str, float]) -> list[Profile]:
    """The upper accuracy-time hull of the profiles that have a measured time, as surrogate profiles whose
    ``flops_fraction`` holds the time fraction (so :func:`~service.earlyexit.hull.select_by_target` and every
    other FLOPs-axis helper work on time unchanged), sorted by time. Raises
    :class:`~service.earlyexit.hull.TargetUnreachable` when no profile is timed."""
    timed = [p for p in profiles if p.name in time_fraction]
    if not timed:
        raise TargetUnreachable("no profile has a measured time: run `classmeans timing` on this machine")
    t = np.array([time_fraction[p.name] for p in timed])
    acc = np.array([p.accuracy for p in timed])
    return [Profile(timed[i].name, timed[i].thresholds, timed[i].flops, time_fraction[timed[i].name],
                    timed[i].accuracy) for i in upper_hull(t, acc)]


def select_by_time(profiles: Sequence[Profile], time_fraction: dict[str, float], max_time_fraction: float
                   ) -> Operating:
    """The most accurate point whose expected time is at most ``max_time_fraction`` of the full network's, on
    the accuracy-time hull of the profiles that have a measured time (``time_fraction`` by name); between two
    vertices, their time-shared mix (expected time and accuracy mix linearly, as FLOPs do). The returned
    :class:`Operating` carries the real FLOPs fraction of that mix. Raises
    :class:`~service.earlyexit.hull.TargetUnreachable` (naming the cheapest time) when none is that fast."""
    surrogate = time_hull(profiles, time_fraction)
    real = {p.name: p for p in profiles}
    try:
        op = select_by_target(surrogate, max_flops_fraction=max_time_fraction)
    except TargetUnreachable:
        cheapest = min(p.flops_fraction for p in surrogate)
        raise TargetUnreachable(f"no profile takes at most {max_time_fraction:.4f} of the full network's time "
                                f"(fastest {cheapest:.4f})") from None
    fa = real[op.a].flops_fraction
    fb = real[op.b].flops_fraction if op.b is not None else fa
    return Operating(op.a, op.b, op.lam, op.lam * fa + (1 - op.lam) * fb, op.accuracy)


def profile_time_entry(share: torch.Tensor | Sequence[float], thresholds: torch.Tensor | Sequence[float],
                       tables: dict[int, TimeTable] | dict[int, CascadeTimeTable]) -> dict:
    """One class-means profile on the time axis, as ``timing.json`` stores it: ``{"ms": {batch: ms},
    "time_fraction": {batch: ms / full network's ms}, "exit_share": [M shares]}`` (:func:`expected_ms`)."""
    ms = {str(b): round(expected_ms(share, thresholds, t), 6) for b, t in tables.items()}
    return {"ms": ms, "time_fraction": {str(b): round(ms[str(b)] / t.full_ms, 6) for b, t in tables.items()},
            "exit_share": [round(float(x), 6) for x in torch.as_tensor(share).tolist()]}
