"""Euclidean distances to class means (Eq. 3) as one matrix product."""

from __future__ import annotations

import torch


def euclidean_distances(x: torch.Tensor, means: torch.Tensor, means_sqnorm: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """``d[b, k] = ||x_b - c_k||_2`` (Eq. 3).

    Computed as ``sqrt(max(||x||^2 - 2 x.c + ||c||^2, 0))``: one ``(B, D) @ (D, K)`` matmul, with
    ``||c||^2`` precomputed; the clamp removes tiny negatives from cancellation before the square root.

    Args:
        x: ``(B, D)`` features.
        means: ``(K, D)`` class means.
        means_sqnorm: ``(K,)`` precomputed ``||c_k||^2`` (computed here when omitted).
    Returns:
        ``(B, K)`` distances, same dtype as ``x``.
    """
    if means_sqnorm is None:
        means_sqnorm = (means * means).sum(1)
    x_sq = (x * x).sum(1, keepdim=True)
    d2 = torch.addmm(means_sqnorm.unsqueeze(0) + x_sq, x, means.t(), alpha=-2.0)
    return d2.clamp_min_(0.0).sqrt_()
