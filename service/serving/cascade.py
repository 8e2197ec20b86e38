"""The cascade runner: one loop for every decision mode.

Run a batch stage by stage; at each exit the rows still running consult what their
:class:`~service.earlyexit.policy.ExitPolicy` enables there (the class-means head, the internal
classifier, or both), rows whose criteria fire leave with their predictor's argmax, the batch is compacted
and goes on; rows left after the last stage take the network's own argmax. Each row may carry its own
policy, so one batch can mix profiles of every mode (per-request overrides, time sharing).

Three paths, one decision: a single row (batch 1, the latency case) runs on Python scalars precomputed
per policy (:attr:`ExitPolicy.plan`); a batch of one policy consults whole running batches with scalar
thresholds; a mixed batch gathers each row's thresholds. They give the same exits, predictions, rules and
FLOPs (``tests/serving/test_runner.py`` for class means, ``tests/offline/test_ics.py``
``test_runner_equals_offline_table_in_every_mode`` for every mode), and the offline
:class:`~service.earlyexit.cascade_table.CascadeTable` gives the same decisions from cached scores.

No path names a decision mode: each reads the policy's data and the criterion slots of
:mod:`service.earlyexit.modes` (which head each slot reads, its score, the threshold that disables it), so a
mode added to that table runs here unchanged (``tests/serving/test_extra_mode.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.backbones import StagedNetwork
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.ic_rules import entropy
from service.earlyexit.modes import CM_HEAD, CRITERIA, DISABLED, FINAL_RULE, HEADS, IC_HEAD, RULE_NAMES, rule_index
from service.earlyexit.policy import ExitPolicy

_IC, _CM, _BOTH = (RULE_NAMES.index(r) for r in ("ic", "cm", "ic+cm"))
SLOTS = {h: tuple(s for s, c in enumerate(CRITERIA) if c.head == h) for h in HEADS}  # criterion slots per head


@dataclass
class ExitResult:
    """Per row: ``exit_index (B,)`` backbone exit (``M - 1``: the network's head), ``pred (B,)``,
    ``confidence (B,)`` and ``probs (B, K)`` float32 of the output that predicted (class-means Eq. 5
    probabilities, an IC's softmax, or the network's softmax at the head), ``flops (B,)`` float64 (backbone
    plus every head consulted), ``rule (B,)`` index into :data:`~service.earlyexit.ic_rules.RULE_NAMES`."""

    exit_index: torch.Tensor
    pred: torch.Tensor
    confidence: torch.Tensor
    probs: torch.Tensor
    flops: torch.Tensor
    rule: torch.Tensor

    def rule_names(self) -> list[str]:
        return [RULE_NAMES[r] for r in self.rule.tolist()]


@dataclass
class _Step:
    """What one exit decided for the ``n`` rows that reached it."""

    fire: torch.Tensor  # (n,) bool
    fired_cm: torch.Tensor | None
    fired_ic: torch.Tensor | None
    top: torch.Tensor  # (n,) the predictor's top probability
    pred: torch.Tensor  # (n,)
    probs: torch.Tensor  # (n, K)


def distinct_policies(policies: ExitPolicy | Sequence[ExitPolicy], b: int
                      ) -> tuple[list[ExitPolicy], list[int] | None]:
    """The distinct policies of a batch of ``b`` rows, and each row's index into them (None: one policy for
    every row). Raises ``ValueError`` when a per-row list does not have ``b`` entries."""
    if isinstance(policies, ExitPolicy):
        return [policies], None
    if len(policies) != b:
        raise ValueError(f"{len(policies)} policies for {b} rows")
    distinct: list[ExitPolicy] = []
    slot: dict[int, int] = {}
    rows = []
    for p in policies:
        if id(p) not in slot:
            slot[id(p)] = len(distinct)
            distinct.append(p)
        rows.append(slot[id(p)])
    return distinct, rows if len(distinct) > 1 else None


class CascadeRunner:
    """The network, its class-means heads (``exit -> ExitHead``) and ICs; runs any :class:`ExitPolicy`."""

    def __init__(self, net: StagedNetwork, cm_heads: dict[int, ExitHead], ics: ICSet | None = None) -> None:
        self.net = net.eval()
        self.num_exits = net.num_exits
        self.cm_heads = dict(cm_heads)
        self.ics = ics.eval() if ics is not None else None
        self.ic_heads = {e: ics[i] for i, e in enumerate(ics.exits)} if ics is not None else {}
        self._checked: dict[int, ExitPolicy] = {}

    # -- heads ---------------------------------------------------------------------------------------

    def _cm(self, j: int, feat: torch.Tensor) -> torch.Tensor:
        return self.cm_heads[j].probabilities(feat).float()

    def _ic(self, j: int, feat: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.ic_heads[j](feat).float(), 1)

    def _head(self, head: str, j: int, feat: torch.Tensor) -> torch.Tensor:
        """``(n, K)`` probabilities of ``head`` (:data:`~service.earlyexit.modes.HEADS`) at exit ``j``."""
        return self._cm(j, feat) if head == CM_HEAD else self._ic(j, feat)

    def check(self, policy: ExitPolicy) -> ExitPolicy:
        """Raise ``ValueError`` when ``policy`` needs a head this runner does not have (checked once)."""
        if self._checked.get(id(policy)) is policy:
            return policy
        if policy.num_exits != self.num_exits:
            raise ValueError(f"policy {policy.name!r} has {policy.num_exits} exits, the network {self.num_exits}")
        for head, what in zip(HEADS, ("class means", "internal classifier"), strict=True):
            have = set(self.cm_heads if head == CM_HEAD else self.ic_heads)
            missing = [j for j, heads in enumerate(policy.heads_at) if head in heads and j not in have]
            if missing:
                raise ValueError(f"exits {missing} are enabled but have no {what}")
        if len(self._checked) >= 256:
            self._checked.clear()
        self._checked[id(policy)] = policy
        return policy

    # -- entry point ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, x: torch.Tensor, policies: ExitPolicy | Sequence[ExitPolicy]) -> ExitResult:
        """``x (B, 3, H, W)`` normalised images; one policy for every row, or one per row."""
        b = x.shape[0]
        distinct, rows = distinct_policies(policies, b)
        index = torch.tensor(rows, dtype=torch.int64) if rows is not None else None
        for p in distinct:
            self.check(p)
        if index is None:
            return self._run_one(x, distinct[0]) if b == 1 else self._run_uniform(x, distinct[0])
        return self._run_mixed(x, distinct, index)

    # -- batch 1 -------------------------------------------------------------------------------------

    def _run_one(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """One row on Python scalars: the same decisions and FLOPs as the batched paths (float32 scores
        compared with float32 thresholds as doubles, exactly), without masks or compaction."""
        consulted = 0.0
        plan = policy.plan
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            step = plan[j]
            if step is None:
                continue
            _, t, cost = step
            consulted += cost
            probs = {h: self._head(h, j, feat) for h in policy.heads_at[j]}
            fired = dict.fromkeys(HEADS, False)
            for s, crit in enumerate(CRITERIA):
                if t[s] < crit.disabled and not fired[crit.head]:
                    p = probs[crit.head]
                    fired[crit.head] = (float(p.max()) if crit.score == "top" else -float(entropy(p)[0])) > t[s]
            if fired[CM_HEAD] or fired[IC_HEAD]:
                out = probs[policy.predictor]
                c, pr = out.max(1)
                return ExitResult(torch.tensor([j]), pr, c, out,
                                  torch.tensor([policy.cum[j] + consulted], dtype=torch.float64),
                                  torch.tensor([rule_index(fired[CM_HEAD], fired[IC_HEAD])]))
        p = torch.softmax(self.net.head(feat).float(), 1)
        c, pr = p.max(1)
        m = self.num_exits
        return ExitResult(torch.tensor([m - 1]), pr, c, p,
                          torch.tensor([policy.cum[m - 1] + consulted], dtype=torch.float64),
                          torch.tensor([FINAL_RULE]))

    # -- batches -------------------------------------------------------------------------------------

    def _run_uniform(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """Every row has ``policy`` (one profile: the common case). A disabled exit costs no tensor
        operation; the FLOPs of the heads consulted are a per-exit table of Python floats."""
        acc = _Outputs(x.shape[0], self.num_exits)
        consulted = 0.0
        consulted_at = [0.0] * self.num_exits  # head FLOPs spent by a row that leaves at exit j
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            step = policy.plan[j]
            if step is None:
                continue
            _, t, cost = step
            consulted += cost
            consulted_at[j] = consulted
            s = _decide({h: self._head(h, j, feat) for h in policy.heads_at[j]}, policy.predictor, t)
            feat = acc.record(j, s, feat)
            if feat.shape[0] == 0:
                break
        consulted_at[-1] = consulted
        self._finish(acc, feat)
        acc.flops = policy.backbone_cum[acc.exit_index] + torch.tensor(consulted_at, dtype=torch.float64)[
            acc.exit_index]
        return acc.result()

    def _run_mixed(self, x: torch.Tensor, policies: list[ExitPolicy], index: torch.Tensor) -> ExitResult:
        """Rows with different policies (``index (B,)`` into ``policies``): per-row thresholds and costs."""
        b = x.shape[0]
        acc = _Outputs(b, self.num_exits)
        t_all = torch.stack([p.thresholds for p in policies])  # (P, 3, M-1)
        on_all = t_all < torch.tensor(DISABLED).view(1, -1, 1)
        stage_on = on_all.any(1).any(0).tolist()
        predictor = torch.tensor([HEADS.index(p.predictor) for p in policies])  # (P,) index into HEADS
        cost = torch.stack([p.head_cost for p in policies])  # (P, 2, M-1)
        consulted = torch.zeros(b, dtype=torch.float64)
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            if not stage_on[j]:
                continue
            pol = index[acc.rows]
            t, on, by = t_all[pol, :, j], on_all[pol, :, j], predictor[pol]
            any_on = on.any(1)
            if not bool(any_on.any()):
                continue
            need = [on[:, list(SLOTS[h])].any(1) | (any_on & (by == i)) for i, h in enumerate(HEADS)]
            consulted[acc.rows] += need[0] * cost[pol, 0, j] + need[1] * cost[pol, 1, j]
            s = self._decide_rows(j, feat, t, need, by)
            feat = acc.record(j, s, feat)
            if feat.shape[0] == 0:
                break
        self._finish(acc, feat)
        backbone = torch.stack([p.backbone_cum for p in policies])  # (P, M)
        acc.flops = backbone[index, acc.exit_index] + consulted
        return acc.result()

    def _decide_rows(self, j: int, feat: torch.Tensor, t: torch.Tensor, need: list[torch.Tensor],
                     by: torch.Tensor) -> _Step:
        """One exit for rows with their own thresholds ``t (n, 3)``: each head (``need[h] (n,)``, per
        :data:`HEADS`) runs on the rows that need it; ``by (n,)`` indexes each row's predictor head. A
        disabled slot's threshold is one no score exceeds, so every slot of a head is compared."""
        n = feat.shape[0]
        fired = {h: torch.zeros(n, dtype=torch.bool) for h in HEADS}
        top = torch.zeros(n, dtype=torch.float32)
        pred = torch.zeros(n, dtype=torch.int64)
        probs: torch.Tensor | None = None
        for i, head in enumerate(HEADS):
            if not bool(need[i].any()):
                continue
            loc = torch.nonzero(need[i]).flatten()
            p = self._head(head, j, feat[loc])
            c, pr = p.max(1)
            f: torch.Tensor | None = None
            for s in SLOTS[head]:
                g = _score(CRITERIA[s].score, c, p) > t[loc, s]
                f = g if f is None else f | g
            assert f is not None
            fired[head][loc] = f
            mine = by[loc] == i
            if probs is None:
                probs = torch.zeros(n, p.shape[1], dtype=torch.float32)
            at = loc[mine]
            top[at], pred[at], probs[at] = c[mine], pr[mine], p[mine]
        assert probs is not None
        return _Step(fired[CM_HEAD] | fired[IC_HEAD], fired[CM_HEAD], fired[IC_HEAD], top, pred, probs)

    def _finish(self, acc: _Outputs, feat: torch.Tensor) -> None:
        """Rows still running take the network's own classifier."""
        if feat.shape[0] == 0:
            return
        p = torch.softmax(self.net.head(feat).float(), 1)
        c, pr = p.max(1)
        acc.set_rows(acc.rows, pr, c, p)


def _score(kind: str, top: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A criterion's score from its head's probabilities: the top probability, or minus the entropy."""
    return top if kind == "top" else -entropy(probs)


def _decide(probs: dict[str, torch.Tensor], predictor: str, t: tuple[float, float, float]) -> _Step:
    """One exit for rows sharing scalar thresholds ``t`` (per criterion slot); ``probs``: the consulted
    heads' probabilities. A head's ``fired`` is None where none of its criteria is enabled."""
    tops = {h: p.max(1) for h, p in probs.items()}
    fired: dict[str, torch.Tensor | None] = dict.fromkeys(HEADS)
    for s, crit in enumerate(CRITERIA):
        if t[s] < crit.disabled:
            g = _score(crit.score, tops[crit.head][0], probs[crit.head]) > t[s]
            f = fired[crit.head]
            fired[crit.head] = g if f is None else f | g
    fired_cm, fired_ic = fired[CM_HEAD], fired[IC_HEAD]
    fire = fired_cm if fired_ic is None else (fired_ic if fired_cm is None else fired_cm | fired_ic)
    assert fire is not None
    top, pred = tops[predictor]
    return _Step(fire, fired_cm, fired_ic, top, pred, probs[predictor])


class _Outputs:
    """The per-row answers being filled in, and the original row of every row still running."""

    def __init__(self, b: int, num_exits: int) -> None:
        self.b = b
        self.exit_index = torch.full((b,), num_exits - 1, dtype=torch.int64)
        self.pred = torch.zeros(b, dtype=torch.int64)
        self.conf = torch.zeros(b, dtype=torch.float32)
        self.codes = [FINAL_RULE] * num_exits  # rule of the rows leaving at exit j where one criterion family fired
        self.rule: torch.Tensor | None = None  # per-row rules (-1: see ``codes``), once an exit had both families
        self.probs: torch.Tensor | None = None
        self.flops = torch.zeros(b, dtype=torch.float64)
        self.rows = torch.arange(b)

    def set_rows(self, rows: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor, probs: torch.Tensor) -> None:
        if self.probs is None:
            if rows.shape[0] == self.b:  # every row at once: keep the tensors as they are
                self.pred, self.conf, self.probs = pred, conf, probs
                return
            self.probs = torch.zeros(self.b, probs.shape[1], dtype=torch.float32)
        self.pred[rows], self.conf[rows], self.probs[rows] = pred, conf, probs

    def record(self, j: int, s: _Step, feat: torch.Tensor) -> torch.Tensor:
        """Rows of ``s`` that fire leave at exit ``j``; returns the features of the rows that go on."""
        if not bool(s.fire.any()):
            return feat
        fire = s.fire
        out = self.rows[fire]
        self.exit_index[out] = j
        if s.fired_cm is None or s.fired_ic is None:  # one family at this exit: its rule, for every row
            self.codes[j] = _IC if s.fired_cm is None else _CM
        else:
            fc, fi = s.fired_cm[fire], s.fired_ic[fire]
            if self.rule is None:
                self.rule = torch.full((self.b,), -1, dtype=torch.int64)
            self.rule[out] = torch.where(fi & fc, _BOTH, torch.where(fi, _IC, _CM))
        self.set_rows(out, s.pred[fire], s.top[fire], s.probs[fire])
        keep = ~fire
        self.rows = self.rows[keep]
        return feat[keep]

    def result(self) -> ExitResult:
        assert self.probs is not None
        rule = torch.tensor(self.codes, dtype=torch.int64)[self.exit_index]
        if self.rule is not None:
            rule = torch.where(self.rule >= 0, self.rule, rule)
        return ExitResult(self.exit_index, self.pred, self.conf, self.probs, self.flops, rule)
