"""A cascade of networks as one exit sequence: the tables, costs and policies of its members, joined.

Members ``0..P-1`` (``M_i`` exits each: stem, blocks, the member's own classifier) form one sequence of
``M = sum_i M_i`` exits; member ``i``'s exits are ``off_i .. off_i + M_i - 1`` with ``off_i = sum_{l<i} M_l``.
A sample runs member 0 from the input; at member ``i``'s early exits it may leave on the class-means rule
(Eq. 2-5, top probability ``> T``); at member ``i``'s own classifier (``i < P - 1``, the *boundary* exit) it
leaves when the softmax top probability of that classifier is ``> T`` (the "Wisdom of Committees" rule),
otherwise the next member runs *from the input* and its cost is added. The last member's classifier always
accepts. So the cascade is the one-criterion decision table of the single-network method with other columns,
and the threshold search, the upper hull, time sharing and profiles apply to it unchanged.

Costs: ``backbone_cum`` of the sequence is every member's cumulative FLOPs shifted by the members before it;
the boundary exit's head costs nothing (the member's classifier is part of its network). A member none of
whose exits is enabled can answer nobody and is not run (:class:`~service.earlyexit.cascade_table.CascadeCosts`
``skips``): with every exit disabled the cascade is the last member alone, the ``full`` reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.earlyexit.costs import ExitCosts
from service.earlyexit.decision_table import DecisionTable
from service.earlyexit.policy import ExitPolicy


def member_offsets(num_exits: Sequence[int]) -> list[int]:
    """``(P,)`` exits per member -> ``(P,)`` index of each member's first exit in the sequence."""
    out, total = [], 0
    for m in num_exits:
        if m < 1:
            raise ValueError("every member needs at least one exit")
        out.append(total)
        total += int(m)
    return out


def locate(num_exits: Sequence[int], exit_index: int) -> tuple[int, int]:
    """Sequence exit -> (member, the member's own exit index)."""
    for i, off in enumerate(member_offsets(num_exits)):
        if exit_index < off + num_exits[i]:
            if exit_index < off:
                break
            return i, exit_index - off
    raise IndexError(f"exit {exit_index} is outside a cascade of {sum(num_exits)} exits")


def join_costs(members: Sequence[ExitCosts]) -> ExitCosts:
    """The members' cost tables as one sequence (module docstring): ``backbone_cum (M,)``, ``head_cost (M-1,)``
    (0 at every boundary), one skip range per member but the last."""
    cum: list[float] = []
    head: list[float] = []
    skips: list[tuple[int, int, float]] = []
    spent = 0.0
    for i, c in enumerate(members):
        first = len(cum)
        cum.extend(spent + float(v) for v in c.backbone_cum)
        head.extend(float(v) for v in c.head_cost)
        if i < len(members) - 1:
            head.append(0.0)  # the member's own classifier: its softmax is part of the network
            skips.append((first, len(cum) - 1, c.full))
        spent += c.full
    return ExitCosts(tuple(cum), tuple(head), tuple(skips))


def join_tables(members: Sequence[DecisionTable]) -> DecisionTable:
    """Member tables on the same samples (same labels, same order) -> the sequence's table ``(N, M)``:
    class-means top probability and prediction at early exits, each member's softmax at its classifier."""
    if not members:
        raise ValueError("a cascade needs at least one member")
    labels = members[0].labels
    for i, t in enumerate(members[1:], 1):
        if not torch.equal(t.labels, labels):
            raise ValueError(f"member {i}'s table is not on the same samples as member 0's")
    return DecisionTable(torch.cat([t.top_prob for t in members], 1), torch.cat([t.pred for t in members], 1),
                         labels)


def member_policy(policy: ExitPolicy, offset: int, num_exits: int) -> ExitPolicy:
    """The part of a sequence policy that member ``[offset, offset + num_exits)`` runs, on the member's own
    exits and FLOPs: ``thresholds (3, num_exits - 1)``, ``backbone_cum`` from the member's input. The member's
    classifier threshold (``policy.thresholds[:, offset + num_exits - 1]``, the boundary) is read by the
    cascade runner, not by the member, whose last exit always accepts."""
    end = offset + num_exits - 1
    base = 0.0 if offset == 0 else float(policy.backbone_cum[offset - 1])
    return ExitPolicy(policy.name, policy.mode, policy.predictor, policy.thresholds[:, offset:end].clone(),
                      policy.head_cost[:, offset:end].clone(), policy.backbone_cum[offset:end + 1] - base)


def member_enabled(policy: ExitPolicy, offset: int, num_exits: int, last: bool) -> bool:
    """Whether a member runs at all under ``policy``: the last always does, another when any of its exits
    (its classifier included) can fire."""
    if last:
        return True
    return bool(policy.enabled()[:, offset:offset + num_exits].any())
