"""Heads folded into their segment's graph: everything that depends only on the bundle is a constant.

Class means (:class:`FusedClassMeans`, from an :class:`~service.earlyexit.ExitHead`): for a feature
``x (B, C, H, W)``

* reduction: average pooling to ``g x g`` (as :func:`~service.earlyexit.reduction.reduce_feature`; a fixed
  ``H/g x W/g`` kernel when it divides the map, which exports without shape information), flatten to
  ``z (B, D)``;
* the metric's scale and projection: ``z' = (z * s) Pr`` (either optional);
* the cross term of Eq. 3 against the precomputed ``-2 C^T`` and ``||c||^2`` in one ``addmm``
  (``C (K, P)`` the class means). Folding ``Pr (-2 C^T)`` into one matrix as well would save a tiny matmul
  but, through the cancellation in ``||z'||^2 - 2 z'.c + ||c||^2``, moved the default model's probabilities
  by up to 5e-5 at ``tau = 0.25`` (measured); kept as two products, the compiled head runs the eager head's
  exact operations on the same constants;
* Eq. 3: ``d = sqrt(max(||z'||^2 + ||c||^2 - 2 z'.c, 0))``;
* Eq. 4-5: ``p = softmax(a * d)`` with ``a_k = -1 / (n_k tau)`` precomputed (``n`` the Eq. 4 normaliser,
  ``tau`` the temperature): the code's ``softmax(-d / n)`` (see :mod:`service.earlyexit.probabilities`).

Internal classifiers (:class:`FusedIC`): SDN's mixed pooling ``alpha * maxpool + (1 - alpha) * avgpool``
followed by ``Linear`` is linear in the two pooled maps, so it is one affine map of their concatenation,
``[max | avg] [alpha W^T ; (1 - alpha) W^T] + b``, then a softmax.

The IC fold is computed in float64 and stored in float32; the compiled heads differ from the eager ones by
the kernels' rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.backbones.internal_classifiers import InternalClassifier
from service.earlyexit import ExitHead
from service.earlyexit.reduction import _grid


class FusedClassMeans(nn.Module):
    """``(B, *feature_shape)`` -> ``(B, K)`` Eq. 5 probabilities of ``head`` (the same operations and constants
    as ``head.probabilities``, so the same values up to the kernels' rounding)."""

    def __init__(self, head: ExitHead, feature_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.pool: tuple[int, int] | None = None  # adaptive output size (non-divisible maps)
        self.kernel: tuple[int, int] | None = None  # the same pooling as a fixed kernel (divisible maps)
        if len(feature_shape) == 3:
            g = _grid(head.reduction)
            h, w = feature_shape[1], feature_shape[2]
            if g is not None and (h > g or w > g):
                oh, ow = min(g, h), min(g, w)
                if h % oh == 0 and w % ow == 0:
                    self.kernel = (h // oh, w // ow)
                else:
                    self.pool = (oh, ow)
        self.scaled = head.scale is not None
        self.projected = head.projection is not None
        self.register_buffer("scale", head.scale.to(torch.float32).clone() if self.scaled else torch.ones(1))
        self.register_buffer("projection", head.projection.to(torch.float32).contiguous() if self.projected
                             else torch.ones(1, 1))
        self.register_buffer("neg2_means_t", head.neg2_means_t.clone())  # (P, K) -2 C^T
        self.register_buffer("means_sqnorm", head.means_sqnorm.clone())  # (K,) ||c||^2
        self.register_buffer("coef", head.coefficients().to(torch.float32).clone())  # (K,) -1 / (n tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim > 2 and self.kernel is not None:
            x = F.avg_pool2d(x, self.kernel)
        elif x.ndim > 2 and self.pool is not None:
            x = F.adaptive_avg_pool2d(x, self.pool)
        z = torch.flatten(x, 1).float()
        if self.scaled:
            z = z * self.scale
        if self.projected:
            z = z @ self.projection
        d2 = torch.addmm(self.means_sqnorm, z, self.neg2_means_t) + (z * z).sum(1, keepdim=True)  # Eq. 3, squared
        d = torch.sqrt(torch.clamp(d2, min=0.0))
        return torch.softmax(d * self.coef, dim=1)  # Eq. 4-5


class FusedIC(nn.Module):
    """``(B, C, H, W)`` -> ``(B, K)`` softmax of an SDN internal classifier, pooling mix folded into the
    linear layer."""

    def __init__(self, ic: InternalClassifier) -> None:
        super().__init__()
        self.kernel = ic.kernel
        self.mixed = ic.mixed
        w = ic.linear.weight.detach().to(torch.float64)  # (K, F)
        if self.mixed:
            a = float(ic.alpha.detach().to(torch.float64))
            affine = torch.cat([a * w.t(), (1.0 - a) * w.t()], 0)  # (2F, K)
        else:
            affine = w.t()
        self.register_buffer("affine", affine.to(torch.float32).contiguous())
        self.register_buffer("bias", ic.linear.bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed:
            z = torch.cat([torch.flatten(F.max_pool2d(x, self.kernel), 1),
                           torch.flatten(F.avg_pool2d(x, self.kernel), 1)], 1)
        else:
            z = torch.flatten(x, 1)
        return torch.softmax(torch.addmm(self.bias, z.float(), self.affine), dim=1)


class FinalSoftmax(nn.Module):
    """The network's own classifier then a softmax: ``(B, *shape) -> (B, K)``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(x).float(), dim=1)
