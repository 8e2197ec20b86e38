"""Threshold search for any cascade rule: random quantile vectors, then local moves around the hull.

Works in score space on a :class:`~service.earlyexit.cascade_table.CascadeTable`; :func:`search_mode`
converts one IC decision mode's thresholds at the boundary (:func:`~service.earlyexit.ic_rules.to_score_thresholds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from service.earlyexit.cascade_table import CascadeCosts, CascadeTable
from service.earlyexit.hull import upper_hull
from service.earlyexit.ic_rules import ICCosts, ICDecisionTable, from_score_thresholds, to_score_thresholds


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
