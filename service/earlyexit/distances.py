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
    return prepared_euclidean_distances(x, -2.0 * means.t(), means_sqnorm)


def prepared_euclidean_distances(x: torch.Tensor, neg2_means_t: torch.Tensor, means_sqnorm: torch.Tensor
                                 ) -> torch.Tensor:
    """Eq. 3 with the class-mean terms precomputed once per head (the serving path, a few tensor ops).

    ``d2 = (||c||^2 - 2 x.c) + ||x||^2``: the first two terms in one ``addmm`` against ``-2 C^T``, then
    clamped at 0 and square-rooted in place. The same value as :func:`euclidean_distances`, which calls this.

    Args:
        x: ``(B, D)`` features.
        neg2_means_t: ``(D, K)`` = ``-2 * means.T``.
        means_sqnorm: ``(K,)`` = ``||c_k||^2``.
    Returns:
        ``(B, K)`` distances.
    """
    d2 = torch.addmm(means_sqnorm, x, neg2_means_t)
    d2 += (x * x).sum(1, keepdim=True)
    return d2.clamp_min_(0.0).sqrt_()
