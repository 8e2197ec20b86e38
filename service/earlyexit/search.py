"""Threshold search over the FLOPs-accuracy plane, evaluated from a decision table.

Modes:

* ``paper``: ``S`` vectors ``T ~ U[0, 1]^(M-1)`` from a fixed seed (the paper's search).
* ``quantile``: each vector enables a random subset of exits; an enabled exit's threshold is a random
  quantile of that exit's observed top probabilities, so every draw lands where decisions change
  (``U[0, 1]`` draws mostly sit above the top probabilities seen at shallow exits and disable them).
* ``refine``: ``quantile``, then rounds of local mutation of the current hull vertices (re-draw a few
  thresholds, switch an exit on or off), keeping what improves the hull.

The full network (every exit disabled) is always a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.earlyexit.costs import ExitCosts
from service.earlyexit.decision_table import DecisionTable
from service.earlyexit.hull import upper_hull

SEARCH_MODES = ("paper", "quantile", "refine")
DISABLED = 1.0


@dataclass
class SearchResult:
    """``thresholds (S, M-1)``, ``flops (S,)`` mean FLOPs, ``accuracy (S,)``; ``hull`` indices by FLOPs."""

    thresholds: torch.Tensor
    flops: torch.Tensor
    accuracy: torch.Tensor
    hull: list[int]


def paper_vectors(num_exits: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=(samples, num_exits - 1))


def quantile_vectors(table: DecisionTable, samples: int, rng: np.random.Generator) -> np.ndarray:
    m1 = table.num_exits - 1
    levels = np.linspace(0.0, 1.0, 201)
    grid = np.quantile(table.top_prob[:, :-1].double().numpy(), levels, axis=0)  # (201, M-1)
    pick = rng.integers(0, len(levels), size=(samples, m1))
    values = grid[pick, np.arange(m1)[None, :]]
    # Values just below a quantile so "p > T" admits that quantile's sample itself.
    values = np.nextafter(values, -np.inf)
    p_enable = rng.uniform(0.02, 0.6, size=(samples, 1))
    enabled = rng.random((samples, m1)) < p_enable
    return np.where(enabled, values, DISABLED)


def _mutate(base: np.ndarray, table: DecisionTable, per_vertex: int, rng: np.random.Generator) -> np.ndarray:
    m1 = base.shape[1]
    levels = np.linspace(0.0, 1.0, 201)
    grid = np.quantile(table.top_prob[:, :-1].double().numpy(), levels, axis=0)
    out = np.repeat(base, per_vertex, axis=0)
    n = out.shape[0]
    for _ in range(2):
        cols = rng.integers(0, m1, size=n)
        action = rng.random(n)
        new_vals = np.nextafter(grid[rng.integers(0, len(levels), size=n), cols], -np.inf)
        cur = out[np.arange(n), cols]
        # Small moves along the quantile grid for enabled exits, or toggle the exit.
        out[np.arange(n), cols] = np.where(action < 0.25, DISABLED,
                                           np.where((action < 0.5) | (cur >= DISABLED), new_vals,
                                                    np.clip(cur + rng.normal(0, 0.02, n), 0.0, 0.999999)))
    return out


def search_thresholds(table: DecisionTable, costs: ExitCosts, mode: str = "paper", samples: int = 10_000,
                      seed: int = 0, refine_rounds: int = 6) -> SearchResult:
    """Draw candidate threshold vectors, evaluate them all from ``table``, keep the upper hull."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; use one of {SEARCH_MODES}")
    rng = np.random.default_rng(seed)
    m1 = table.num_exits - 1
    cand = paper_vectors(table.num_exits, samples, rng) if mode == "paper" else quantile_vectors(table, samples, rng)
    cand = np.vstack([np.full((1, m1), DISABLED), cand])  # the full network is always a candidate
    thresholds = torch.from_numpy(cand.astype(np.float32))
    flops, acc = table.evaluate(thresholds, costs)
    if mode == "refine":
        per_vertex = max(8, samples // 40)
        for _ in range(refine_rounds):
            hull = upper_hull(flops.numpy(), acc.numpy())
            extra = torch.from_numpy(_mutate(thresholds[hull].double().numpy(), table, per_vertex, rng)
                                     .astype(np.float32))
            f2, a2 = table.evaluate(extra, costs)
            thresholds = torch.cat([thresholds, extra])
            flops, acc = torch.cat([flops, f2]), torch.cat([acc, a2])
    hull = upper_hull(flops.numpy(), acc.numpy())
    return SearchResult(thresholds, flops, acc, hull)
