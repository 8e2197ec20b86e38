"""Result assembly, once for every decision mode: a cascade run's rows -> one outcome per request."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.serving.cascade import ExitResult
from service.serving.snapshot import InferenceOutcome, InferenceRequest, SamplePrediction


def outcomes(requests: Sequence[InferenceRequest], res: ExitResult, served: Sequence[str], exits: list[int],
             flops: list[float], rules: list[str], classes: Sequence[str], seconds: float,
             members: Sequence[str] | None = None) -> list[InferenceOutcome]:
    """Split the rows of ``res`` (in request order; ``served``: each row's profile; ``exits``, ``flops``,
    ``rules``: ``res``'s as Python lists; ``members``: a cascade's answering member per row) into the requests'
    predictions with their top-k classes."""
    snap = requests[0].snapshot
    k_all = len(classes)
    k_max = max(min(r.top_k, k_all) for r in requests)
    top_p, top_i = torch.topk(res.probs, k_max, dim=1)
    preds, confs = res.pred.tolist(), res.confidence.tolist()
    top_p_l, top_i_l = top_p.tolist(), top_i.tolist()
    names, policies = snap.bundle.exit_names, snap.policies
    out, lo = [], 0
    for r in requests:
        k = min(r.top_k, k_all)
        samples = []
        for j in range(lo, lo + r.size):
            samples.append(SamplePrediction(
                preds[j], classes[preds[j]], confs[j],
                [(top_i_l[j][q], classes[top_i_l[j][q]], top_p_l[j][q]) for q in range(k)],
                exits[j], names[exits[j]], flops[j], served[j], rules[j], policies[served[j]].mode,
                members[j] if members is not None else None))
        out.append(InferenceOutcome(samples, seconds))
        lo += r.size
    return out

