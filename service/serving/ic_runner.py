"""The batched exit runner for the IC decision modes (``cm``, ``ic_prob``, ``ic_entropy``, ``combined``).

The same loop as :class:`service.serving.runner.ExitRunner`: run the batch stage by stage; at each IC exit
the rows still running consult what their mode needs, rows that fire are recorded and removed, the rest
go on; rows left after the last stage take the network's own argmax. Each row carries its own mode and
thresholds, so one batch can mix profiles of different modes.

Per-row thresholds ``(B, 2, E)`` in the rules' own units (:mod:`service.earlyexit.ic_rules`):

* slot 0 -- the IC threshold: a top probability (``ic_prob``, ``combined``; ``>= 1`` off) or an entropy
  (``ic_entropy``; ``<= 0`` off); ignored by ``cm``;
* slot 1 -- the class-means threshold (``cm``, ``combined``; ``>= 1`` off); ignored by the IC-only modes.

:func:`row_thresholds` turns a stored profile's thresholds into this layout. The result says, per row, the
exit, the prediction, its confidence, the FLOPs spent (backbone + every IC and class-means head
consulted) and which rule fired (:data:`~service.earlyexit.ic_rules.RULE_NAMES`).

Equivalent, sample for sample, to the offline :class:`~service.earlyexit.ic_rules.ICDecisionTable`
(``tests/test_ics.py``). Wiring into the engine: build one ``ICExitRunner`` next to the ``ExitRunner``
when the model directory has ICs, route rows whose profile names an IC mode to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.backbones import StagedNetwork
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.ic_rules import MODES, RULE_NAMES, ICCosts, entropy

_IC, _CM, _BOTH, _FINAL = (RULE_NAMES.index(r) for r in ("ic", "cm", "ic+cm", "final"))


@dataclass
class ICExitResult:
    """Per row: ``exit_stage (B,)`` backbone exit index (``M_backbone - 1`` = the network's head),
    ``ic_exit (B,)`` IC exit index (``E`` = the head), ``pred (B,)``, ``confidence (B,)`` (top probability of
    the output that predicted), ``flops (B,)`` float64, ``rule (B,)`` index into ``RULE_NAMES``, ``probs (B, K)``
    float32: the probabilities of the output that predicted (the IC's softmax, the class-means Eq. 5
    probabilities in mode ``cm``, the network's softmax at the head)."""

    exit_stage: torch.Tensor
    ic_exit: torch.Tensor
    pred: torch.Tensor
    confidence: torch.Tensor
    flops: torch.Tensor
    rule: torch.Tensor
    probs: torch.Tensor

    def rule_names(self) -> list[str]:
        return [RULE_NAMES[int(r)] for r in self.rule]


def row_thresholds(mode: str, thresholds: torch.Tensor | Sequence) -> torch.Tensor:
    """One profile's thresholds (``(E,)``, or ``(2, E)`` for ``combined``) -> the ``(2, E)`` row layout."""
    if mode not in MODES:
        raise ValueError(f"unknown decision mode {mode!r}")
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    if mode == "combined":
        if t.ndim != 2 or t.shape[0] != 2:
            raise ValueError("combined thresholds must be (2, E)")
        return t
    if t.ndim != 1:
        raise ValueError(f"{mode} thresholds must be (E,)")
    off = torch.ones_like(t)
    if mode == "cm":
        return torch.stack([off, t])
    return torch.stack([t, off])


class ICExitRunner:
    def __init__(self, net: StagedNetwork, ics: ICSet, costs: ICCosts,
                 cm_heads: dict[int, ExitHead] | None = None) -> None:
        if len(costs.ic_cost) != len(ics):
            raise ValueError("costs describe a different number of IC exits")
        self.net = net.eval()
        self.ics = ics.eval()
        self.costs = costs
        self.cm_heads = cm_heads or {}
        self.num_ic = len(ics)
        self.stage_to_ic = {e: i for i, e in enumerate(ics.exits)}
        self._ic_cost = torch.tensor(costs.ic_cost, dtype=torch.float64)
        self._cm_cost = torch.tensor(costs.cm_cost, dtype=torch.float64)
        self._backbone = torch.tensor(costs.backbone_cum, dtype=torch.float64)

    def _modes(self, modes: str | Sequence[str], b: int) -> torch.Tensor:
        if isinstance(modes, str):
            modes = [modes] * b
        if len(modes) != b:
            raise ValueError("one mode per row")
        bad = sorted({m for m in modes if m not in MODES})
        if bad:
            raise ValueError(f"unknown decision modes {bad}; use {MODES}")
        if not self.cm_heads and any(m in ("cm", "combined") for m in modes):
            raise ValueError("modes cm and combined need class means (a bundle)")
        return torch.tensor([MODES.index(m) for m in modes], dtype=torch.int64)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, modes: str | Sequence[str], thresholds: torch.Tensor) -> ICExitResult:
        """``x (B, 3, H, W)`` normalised images; ``modes``: one for all rows or one per row;
        ``thresholds (B, 2, E)`` or ``(2, E)`` (see the module docstring)."""
        b = x.shape[0]
        mode = self._modes(modes, b)
        t = torch.as_tensor(thresholds, dtype=torch.float32)
        if t.ndim == 2:
            t = t.unsqueeze(0).expand(b, -1, -1)
        if t.shape != (b, 2, self.num_ic):
            raise ValueError(f"thresholds must be ({b}, 2, {self.num_ic}) or (2, {self.num_ic})")
        if b == 1:
            return self._run_one(x, int(mode[0]), t[0])
        m_cm, m_prob, m_ent, m_comb = (MODES.index(m) for m in ("cm", "ic_prob", "ic_entropy", "combined"))
        n_stage = len(self.net.stages)
        exit_stage = torch.full((b,), n_stage, dtype=torch.int64)
        ic_exit = torch.full((b,), self.num_ic, dtype=torch.int64)
        pred = torch.zeros(b, dtype=torch.int64)
        conf = torch.zeros(b, dtype=torch.float32)
        rule = torch.full((b,), _FINAL, dtype=torch.int64)
        probs = torch.zeros(b, self.ics.num_classes, dtype=torch.float32)
        consulted = torch.zeros(b, dtype=torch.float64)
        rows = torch.arange(b)
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            i = self.stage_to_ic.get(j)
            if i is None:
                continue
            mr, t_ic, t_cm = mode[rows], t[rows, 0, i], t[rows, 1, i]
            ic_on = ((mr == m_prob) & (t_ic < 1)) | ((mr == m_ent) & (t_ic > 0))
            cm_on = ((mr == m_cm) | (mr == m_comb)) & (t_cm < 1)
            need_ic = ic_on | ((mr == m_comb) & ((t_ic < 1) | cm_on))
            n_run = rows.shape[0]
            fire_ic = torch.zeros(n_run, dtype=torch.bool)
            fire_cm = torch.zeros(n_run, dtype=torch.bool)
            ic_pred = torch.zeros(n_run, dtype=torch.int64)
            ic_top = torch.zeros(n_run, dtype=torch.float32)
            ic_q: torch.Tensor | None = None
            cm_p: torch.Tensor | None = None
            cm_pred = torch.zeros(n_run, dtype=torch.int64)
            cm_top = torch.zeros(n_run, dtype=torch.float32)
            if bool(need_ic.any()):
                loc = torch.nonzero(need_ic).flatten()
                q = torch.softmax(self.ics[i](feat[loc]).float(), 1)
                ic_q = torch.zeros(n_run, q.shape[1], dtype=torch.float32)
                ic_q[loc] = q
                top, p = q.max(1)
                ic_top[loc], ic_pred[loc] = top, p
                ent = entropy(q)
                is_ent = mr[loc] == m_ent
                fire_ic[loc] = torch.where(is_ent, (ent < t_ic[loc]) & (t_ic[loc] > 0),
                                           (top > t_ic[loc]) & (t_ic[loc] < 1))
                consulted[rows[loc]] += self._ic_cost[i]
            if bool(cm_on.any()):
                loc = torch.nonzero(cm_on).flatten()
                head = self.cm_heads.get(self.net_exit(i))
                if head is not None:
                    pc = head.probabilities(feat[loc])
                    cm_p = torch.zeros(n_run, pc.shape[1], dtype=torch.float32)
                    cm_p[loc] = pc.float()
                    top, p = pc.max(1)
                    cm_top[loc], cm_pred[loc] = top, p
                    fire_cm[loc] = top > t_cm[loc]
                consulted[rows[loc]] += self._cm_cost[i]
            fire = fire_ic | fire_cm
            if not bool(fire.any()):
                continue
            leave = torch.nonzero(fire).flatten()
            out = rows[leave]
            use_cm = mr[leave] == m_cm
            pred[out] = torch.where(use_cm, cm_pred[leave], ic_pred[leave])
            conf[out] = torch.where(use_cm, cm_top[leave], ic_top[leave])
            if ic_q is not None:
                probs[out[~use_cm]] = ic_q[leave[~use_cm]]
            if cm_p is not None:
                probs[out[use_cm]] = cm_p[leave[use_cm]]
            fi, fc = fire_ic[leave], fire_cm[leave]
            rule[out] = torch.where(fi & fc, _BOTH, torch.where(fi, _IC, _CM))
            exit_stage[out] = j
            ic_exit[out] = i
            keep = ~fire
            rows, feat = rows[keep], feat[keep]
            if rows.numel() == 0:
                break
        if rows.numel() > 0:
            p = torch.softmax(self.net.head(feat).float(), 1)
            c, pr = p.max(1)
            pred[rows], conf[rows], probs[rows] = pr, c, p
        flops = self._backbone[ic_exit] + consulted
        return ICExitResult(exit_stage, ic_exit, pred, conf, flops, rule, probs)

    def _run_one(self, x: torch.Tensor, mode: int, t: torch.Tensor) -> ICExitResult:
        """One row (batch 1, the latency case): the same decisions, FLOPs and outputs as the batched loop,
        with Python scalars instead of per-row masks. Thresholds and scores are float32 values compared
        exactly as doubles, and the FLOPs are summed in the same order, so the results are identical."""
        m_cm, m_prob, m_ent, m_comb = (MODES.index(m) for m in ("cm", "ic_prob", "ic_entropy", "combined"))
        t_ic, t_cm = t[0].tolist(), t[1].tolist()
        consulted = 0.0
        feat = x
        for j, stage in enumerate(self.net.stages):
            feat = stage(feat)
            i = self.stage_to_ic.get(j)
            if i is None:
                continue
            ti, tc = t_ic[i], t_cm[i]
            ic_on = (mode == m_prob and ti < 1) or (mode == m_ent and ti > 0)
            cm_on = mode in (m_cm, m_comb) and tc < 1
            fire_ic = fire_cm = False
            q = pc = None
            if ic_on or (mode == m_comb and (ti < 1 or cm_on)):
                q = torch.softmax(self.ics[i](feat).float(), 1)
                fire_ic = (ti > 0 and float(entropy(q)[0]) < ti) if mode == m_ent else (ti < 1 and float(q.max()) > ti)
                consulted += self.costs.ic_cost[i]
            if cm_on:
                head = self.cm_heads.get(self.net_exit(i))
                if head is not None:
                    pc = head.probabilities(feat).float()
                    fire_cm = float(pc.max()) > tc
                consulted += self.costs.cm_cost[i]
            if fire_ic or fire_cm:
                out = pc if mode == m_cm else q
                assert out is not None
                c, pr = out.max(1)
                r = _BOTH if fire_ic and fire_cm else (_IC if fire_ic else _CM)
                return ICExitResult(torch.tensor([j]), torch.tensor([i]), pr, c,
                                    torch.tensor([self.costs.backbone_cum[i] + consulted], dtype=torch.float64),
                                    torch.tensor([r]), out)
        p = torch.softmax(self.net.head(feat).float(), 1)
        c, pr = p.max(1)
        return ICExitResult(torch.tensor([len(self.net.stages)]), torch.tensor([self.num_ic]), pr, c,
                            torch.tensor([self.costs.backbone_cum[self.num_ic] + consulted], dtype=torch.float64),
                            torch.tensor([_FINAL]), p)

    def net_exit(self, i: int) -> int:
        """Backbone exit index of IC exit ``i``."""
        return self.ics.exits[i]
