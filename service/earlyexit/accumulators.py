"""Streaming class statistics (Eq. 2) and normalisers (Eq. 4), never holding all features in memory.

Sums are float64. Two accumulators over disjoint parts of a dataset ``merge`` into the accumulator of
the whole, so calibration can be split across batches, workers or files.
"""

from __future__ import annotations

import torch

from service.errors import ServiceError

SECOND_MOMENTS = ("none", "diag", "full")
MAX_FULL_COVARIANCE_DIM = 4096


class CalibrationError(ServiceError, ValueError):
    """Statistics cannot be formed: a class has no samples, or a feature is not finite."""

    code = "calibration_error"
    status = 422


class ClassStatsAccumulator:
    """Per-class sums and counts of one exit's ``(B, D)`` features; optionally second moments.

    ``second_moments``: ``none`` (class means only), ``diag`` (per-dimension sums of squares, for the
    variance-scaled metric) or ``full`` (``X^T X``, for the shared-covariance / LDA metric; ``D <= 4096``).
    """

    def __init__(self, num_classes: int, dim: int, second_moments: str = "none", exit_name: str = "") -> None:
        if second_moments not in SECOND_MOMENTS:
            raise ValueError(f"second_moments must be one of {SECOND_MOMENTS}")
        if second_moments == "full" and dim > MAX_FULL_COVARIANCE_DIM:
            raise CalibrationError(
                f"exit {exit_name or '?'}: D={dim} is too large for a full covariance "
                f"(<= {MAX_FULL_COVARIANCE_DIM}); use a pooled reduction")
        self.num_classes, self.dim, self.second_moments, self.exit_name = num_classes, dim, second_moments, exit_name
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self.sq = torch.zeros(dim, dtype=torch.float64) if second_moments == "diag" else None
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64) if second_moments == "full" else None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``(B, D)`` features with ``(B,)`` integer labels in ``[0, K)``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) features, got {tuple(features.shape)}")
        x = features.to(torch.float32)
        finite = torch.isfinite(x).all(1)
        if not bool(finite.all()):
            bad = labels[~finite]
            raise CalibrationError(
                f"exit {self.exit_name or '?'}: non-finite feature for class index {int(bad[0])}")
        # Per-batch class sums as one (K, B) @ (B, D) float32 matmul, accumulated across batches in float64.
        onehot = torch.zeros(self.num_classes, x.shape[0], dtype=torch.float32)
        onehot[labels, torch.arange(x.shape[0])] = 1.0
        self.sums += (onehot @ x).to(torch.float64)
        self.counts += torch.bincount(labels, minlength=self.num_classes)
        if self.sq is not None:
            self.sq += (x * x).sum(0).to(torch.float64)
        if self.xtx is not None:
            x64 = x.to(torch.float64)
            self.xtx += x64.t() @ x64

    def merge(self, other: ClassStatsAccumulator) -> ClassStatsAccumulator:
        if (other.num_classes, other.dim, other.second_moments) != (self.num_classes, self.dim, self.second_moments):
            raise ValueError("cannot merge accumulators of different shapes")
        self.sums += other.sums
        self.counts += other.counts
        if self.sq is not None and other.sq is not None:
            self.sq += other.sq
        if self.xtx is not None and other.xtx is not None:
            self.xtx += other.xtx
        return self

    def check_complete(self, class_names: list[str] | None = None) -> None:
        empty = torch.nonzero(self.counts == 0).flatten().tolist()
        if empty:
            names = [class_names[k] if class_names else str(k) for k in empty]
            raise CalibrationError(f"exit {self.exit_name or '?'}: no calibration samples for class(es) "
                                   f"{', '.join(names)}")

    def means(self) -> torch.Tensor:
        """Eq. 2: ``c^k = (1 / N_k) sum_{i: y_i = k} x_i``, ``(K, D)`` float64."""
        self.check_complete()
        return self.sums / self.counts.unsqueeze(1).to(torch.float64)

    def within_class_variance(self) -> torch.Tensor:
        """Pooled within-class variance per dimension ``(D,)``: ``(sum x^2 - sum_k N_k c_k^2) / (N - K)``."""
        if self.sq is None and self.xtx is None:
            raise ValueError("accumulated without second moments")
        sq = self.sq if self.sq is not None else self.xtx.diagonal()  # type: ignore[union-attr]
        mu = self.means()
        n = int(self.counts.sum())
        ss = sq - (self.counts.unsqueeze(1).to(torch.float64) * mu * mu).sum(0)
        return (ss / max(1, n - self.num_classes)).clamp_min(0.0)

    def within_class_covariance(self) -> torch.Tensor:
        """Pooled within-class covariance ``(D, D)``: ``(X^T X - sum_k N_k c_k c_k^T) / (N - K)``."""
        if self.xtx is None:
            raise ValueError("accumulated without full second moments")
        mu = self.means()
        n = int(self.counts.sum())
        w = self.counts.to(torch.float64).unsqueeze(1)
        sw = self.xtx - (mu * w).t() @ mu
        return sw / max(1, n - self.num_classes)


class NormaliserAccumulator:
    """Eq. 4: ``n^k`` = mean over all calibration samples of their distance to class mean ``k``."""

    def __init__(self, num_classes: int) -> None:
        self.sums = torch.zeros(num_classes, dtype=torch.float64)
        self.count = 0

    def update(self, distances: torch.Tensor) -> None:
        """Add ``(B, K)`` distances."""
        self.sums += distances.to(torch.float64).sum(0)
        self.count += int(distances.shape[0])

    def merge(self, other: NormaliserAccumulator) -> NormaliserAccumulator:
        self.sums += other.sums
        self.count += other.count
        return self

    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise CalibrationError("no samples for the distance normaliser")
        n = self.sums / self.count
        return torch.where(n > 0, n, torch.ones_like(n))
