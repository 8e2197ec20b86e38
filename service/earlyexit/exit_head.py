"""One exit's decision head: reduce the feature, map it to the metric space, compare with class means.

Metrics (all closed-form from calibration statistics, no gradient training):

* ``euclidean`` (the paper): ``d_k = ||z - c_k||``.
* ``diag``: per-dimension variance scaling, ``d_k = ||(z - c_k) / sigma||`` with ``sigma^2`` the pooled
  within-class variance.
* ``lda``: shared-covariance distances in the ``(K-1)``-dimensional discriminant subspace,
  ``d_k = ||W^T (z - c_k)||`` with ``W`` solving ``S_b W = S_w W Lambda``, ``W^T S_w W = I``; this is the
  Mahalanobis distance restricted to the directions that separate the classes, at ``2 D (K-1)`` FLOPs.

Every head is stored as ``z' = (z * scale) @ projection`` (either part optional), means in ``z'`` space.

Serving cost: what depends only on the calibration (``-2 C^T``, ``||c_k||^2``, ``-1 / (n_k tau)``) is
computed once per head, so consulting an exit at batch 1 is about ten small tensor operations: pooling,
projection, one ``addmm`` for the distances, a multiply and a softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.earlyexit.accumulators import ClassStatsAccumulator
from service.earlyexit.distances import prepared_euclidean_distances
from service.earlyexit.probabilities import probabilities_from_coefficients, probability_coefficients
from service.earlyexit.reduction import reduce_feature, reduction_flops

METRICS = ("euclidean", "diag", "lda")
MOMENTS_FOR_METRIC = {"euclidean": "none", "diag": "diag", "lda": "full"}


@dataclass
class ExitHead:
    """Everything one exit needs to turn a feature into class probabilities.

    Shapes: ``means (K, P)``, ``normaliser (K,)``, ``scale (D,)`` or None, ``projection (D, P)`` or None
    (``P = D`` without projection).
    """

    reduction: str
    metric: str
    means: torch.Tensor
    normaliser: torch.Tensor
    scale: torch.Tensor | None = None
    projection: torch.Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.means = self.means.to(torch.float32).contiguous()
        self.means_sqnorm = (self.means * self.means).sum(1)
        self.neg2_means_t = (-2.0 * self.means).t().contiguous()  # (P, K), for the one-matmul Eq. 3
        self.normaliser = self.normaliser.to(torch.float32)
        self._coef_key: tuple[int, float] | None = None
        self._coef = torch.empty(0)

    def coefficients(self) -> torch.Tensor:
        """``(K,)`` ``-1 / (n_k * tau)`` (Eq. 4-5 as one multiply), cached until ``normaliser`` or
        ``temperature`` is replaced (calibration fills the normaliser after construction)."""
        key = (id(self.normaliser), float(self.temperature))
        if key != self._coef_key:
            self._coef = probability_coefficients(self.normaliser, self.temperature)
            self._coef_key = key
        return self._coef

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    def embed(self, feature: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` or ``(B, D)`` -> ``(B, P)`` in the metric space."""
        z = reduce_feature(feature, self.reduction)
        if self.scale is not None:
            z = z * self.scale
        if self.projection is not None:
            z = z @ self.projection
        return z

    def distances(self, feature: torch.Tensor) -> torch.Tensor:
        """Eq. 3 in the metric space: ``(B, K)``."""
        return prepared_euclidean_distances(self.embed(feature), self.neg2_means_t, self.means_sqnorm)

    def probabilities(self, feature: torch.Tensor) -> torch.Tensor:
        """Eq. 4-5: ``softmax(-(d / n) / tau)``, ``(B, K)`` (the same values as
        ``class_probabilities(self.distances(feature), self.normaliser, self.temperature)``)."""
        return probabilities_from_coefficients(self.distances(feature), self.coefficients())

    def flops(self, feature_shape: tuple[int, ...]) -> int:
        """FLOPs of consulting this exit for one sample (2 per multiply-add).

        pooling adds (one per input element, when pooled) + scaling ``D`` + projection ``2 D P``
        + distances ``3 K P`` (subtract, square, accumulate per class, as counted by the paper's authors).
        """
        d = self.scale.numel() if self.scale is not None else (
            self.projection.shape[0] if self.projection is not None else self.means.shape[1])
        p = self.means.shape[1]
        cost = reduction_flops(feature_shape, self.reduction) + 3 * self.num_classes * p
        if self.scale is not None:
            cost += d
        if self.projection is not None:
            cost += 2 * d * p
        return int(cost)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.means": self.means, f"{prefix}.normaliser": self.normaliser}
        if self.scale is not None:
            out[f"{prefix}.scale"] = self.scale.to(torch.float32).contiguous()
        if self.projection is not None:
            out[f"{prefix}.projection"] = self.projection.to(torch.float32).contiguous()
        return out


def fit_metric(stats: ClassStatsAccumulator, metric: str, shrinkage: float = 1e-3
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Closed-form metric from class statistics -> (scale ``(D,)`` | None, projection ``(D, P)`` | None,
    means in metric space ``(K, P)``)."""
    mu = stats.means()
    if metric == "euclidean":
        return None, None, mu.float()
    if metric == "diag":
        var = stats.within_class_variance()
        floor = shrinkage * float(var.mean()) + 1e-12
        scale = 1.0 / torch.sqrt(var + floor)
        return scale.float(), None, (mu * scale).float()
    if metric == "lda":
        sw = stats.within_class_covariance()
        d = sw.shape[0]
        sw = sw + (shrinkage * float(torch.trace(sw)) / d + 1e-12) * torch.eye(d, dtype=sw.dtype)
        weights = stats.counts.to(torch.float64)
        grand = (weights.unsqueeze(1) * mu).sum(0) / weights.sum()
        centred = mu - grand
        # S_b = C^T C with C = sqrt(w_k / sum w) (mu_k - grand): rank <= K-1. With S_w = L L^T the
        # whitened between-class scatter is B^T B, B = C L^-T, so its leading eigenvectors are B's right
        # singular vectors: a (K x D) SVD and two triangular solves instead of a D x D inverse and eigh.
        c = centred * torch.sqrt(weights / weights.sum()).unsqueeze(1)  # (K, D)
        chol = torch.linalg.cholesky(sw)
        bt = torch.linalg.solve_triangular(chol, c.t(), upper=False)  # (D, K) = L^-1 C^T = B^T
        _, svals, vh = torch.linalg.svd(bt.t(), full_matrices=False)  # vh: (K, D)
        k = min(stats.num_classes - 1, d)
        top = vh[torch.argsort(svals, descending=True)[:k]].t()  # (D, K-1)
        projection = torch.linalg.solve_triangular(chol.t(), top, upper=True)  # L^-T V: W^T S_w W = I
        return None, projection.float(), (mu @ projection).float()
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")


def fit_exit_head(stats: ClassStatsAccumulator, reduction: str, metric: str = "euclidean",
                  temperature: float = 1.0) -> ExitHead:
    """An exit head whose normaliser is still 1; fill it from a second pass (``NormaliserAccumulator``)."""
    scale, projection, means = fit_metric(stats, metric)
    return ExitHead(reduction=reduction, metric=metric, means=means,
                    normaliser=torch.ones(stats.num_classes), scale=scale, projection=projection,
                    temperature=temperature)
