"""Helpers for comparing the compiled engine with the reference one: which rows sit on a threshold tie."""

from __future__ import annotations

import torch

from service.earlyexit.ic_rules import entropy
from service.earlyexit.policy import ExitPolicy
from service.serving.cascade import CascadeRunner, ExitResult

EPS = 1e-5  # a score this close to its threshold may fall either side under another engine's rounding


@torch.inference_mode()
def near_ties(ref: CascadeRunner, policy: ExitPolicy, x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(B,)``: rows with any enabled score within ``eps`` of its threshold at any exit (Eq. 6-7), or whose
    reference top-2 probabilities differ by at most ``eps`` (an argmax tie)."""
    feats = ref.net.run_stages(x)
    t, on = policy.thresholds, policy.enabled()
    near = torch.zeros(x.shape[0], dtype=torch.bool)
    for j in range(policy.num_exits - 1):
        if on[0, j]:
            s = ref.cm_heads[j].probabilities(feats[j]).max(1).values
            near |= (s - t[0, j]).abs() <= eps
        if on[1, j] or on[2, j]:
            q = torch.softmax(ref.ic_heads[j](feats[j]).float(), 1)
            if on[1, j]:
                near |= (q.max(1).values - t[1, j]).abs() <= eps
            if on[2, j]:
                near |= (-entropy(q) - t[2, j]).abs() <= eps
    return near


def differing_rows(got: ExitResult, want: ExitResult, near: torch.Tensor, atol: float = 1e-4) -> int:
    """Assert that rows with another exit or prediction are all ties, and that agreeing rows have the same
    rule and FLOPs and probabilities within ``atol``; returns how many rows differ."""
    top2 = want.probs.topk(2, dim=1).values if want.probs.shape[1] > 1 else None
    if top2 is not None:
        near = near | ((top2[:, 0] - top2[:, 1]) <= EPS)
    differ = (got.exit_index != want.exit_index) | (got.pred != want.pred)
    assert not bool((differ & ~near).any()), f"rows {torch.nonzero(differ & ~near).flatten().tolist()} differ"
    same = ~differ
    for name in ("exit_index", "pred", "confidence", "probs", "flops", "rule"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(got.rule[same], want.rule[same])
    assert torch.equal(got.flops[same], want.flops[same])
    assert torch.allclose(got.probs[same], want.probs[same], atol=atol, rtol=0)
    assert torch.allclose(got.confidence[same], want.confidence[same], atol=atol, rtol=0)
    return int(differ.sum())


class ClassMeansTable:
    """The reference engine's class-means decisions from one eager pass: ``probs[j] (B, K)`` of every exit's
    head (``ExitHead.probabilities``, what the reference runner computes) and the network's softmax last.
    Eq. 6-7 on it gives the reference's exits and predictions for any class-means policy without re-running
    the network per policy (``tests/serving/test_runner.py`` proves runner == table)."""

    @torch.inference_mode()
    def __init__(self, ref: CascadeRunner, x: torch.Tensor) -> None:
        feats = ref.net.run_stages(x)
        self.probs = [ref.cm_heads[j].probabilities(f).float() for j, f in enumerate(feats)]
        self.probs.append(torch.softmax(ref.net.head(feats[-1]).float(), 1))
        self.top = torch.stack([p.max(1).values for p in self.probs])  # (M, B)

    def decide(self, policy: ExitPolicy, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(exit_index, pred, near)`` of a class-means policy: the first enabled exit whose top probability
        is ``> T`` (the head otherwise), its argmax, and rows within ``eps`` of a threshold or an argmax tie."""
        assert policy.mode == "cm"
        m, b = self.top.shape
        t = policy.thresholds[0]
        exit_index = torch.full((b,), m - 1, dtype=torch.int64)
        near = torch.zeros(b, dtype=torch.bool)
        for j in range(m - 2, -1, -1):
            if float(t[j]) >= 1.0:
                continue
            exit_index[self.top[j] > t[j]] = j
            near |= (self.top[j] - t[j]).abs() <= eps
        all_probs = torch.stack(self.probs)  # (M, B, K)
        chosen = all_probs[exit_index, torch.arange(b)]
        top2 = chosen.topk(2, dim=1).values
        return exit_index, chosen.argmax(1), near | ((top2[:, 0] - top2[:, 1]) <= eps)
