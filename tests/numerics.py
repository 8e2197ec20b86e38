"""Tolerances for float32 results, derived from float32 precision and the data's scale.

A tolerance written as a bare number (``atol=1e-3``) encodes one CPU's rounding: the same expression
rounds differently with AVX2 and AVX-512 kernels (another vector width, FMA or not, another blocking of a
matmul's inner sum). The bounds here hold for *any* summation order, so a test that uses them passes on
every x86 CPU (and GPU) and still fails on a real error, which is orders of magnitude larger.

The one fact used: a float32 sum (or dot product) of ``n`` terms whose absolute values add up to ``S``,
accumulated in any order, with or without FMA, is within ``gamma_n * S`` of the exact sum,
``gamma_n = n u / (1 - n u) <= n * eps`` (``u = eps / 2``; Higham, *Accuracy and Stability of Numerical
Algorithms*, Sec. 3.1). :func:`sum_atol` is that bound with ``n * eps``.
"""

from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 2**-23 ~ 1.19e-7


def sum_atol(n_terms: int, magnitude: float | torch.Tensor) -> float | torch.Tensor:
    """Rounding bound of a float32 sum of ``n_terms`` terms whose absolute values add up to
    ``magnitude``, in any order: ``n * eps * magnitude``."""
    return n_terms * EPS32 * magnitude


def sqdist_atol(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` and ``(K, D)`` -> ``(B, K)`` bound on the float32 error of ``||x||^2 - 2 x.c + ||c||^2``.

    Each of the three terms is a ``D``-term sum; their absolute values add up to at most
    ``||x||^2 + 2 ||x|| ||c|| + ||c||^2 = (||x|| + ||c||)^2`` (Cauchy-Schwarz), and combining them costs two
    more roundings: ``(D + 2) * eps * (||x|| + ||c||)^2``. Cancellation makes this the *absolute* error of
    a possibly tiny result: a self-distance ``d^2 = 0`` can come out as ``~eps * 4 ||x||^2``.
    """
    nx = x.double().norm(dim=1).unsqueeze(1)
    nc = c.double().norm(dim=1).unsqueeze(0)
    return sum_atol(x.shape[1] + 2, (nx + nc) ** 2)


def dist_atol(x: torch.Tensor, c: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bound on the float32 error of ``d = sqrt(max(d^2, 0))`` computed by expansion, against
    the exact distances ``exact``.

    With ``e`` the bound of :func:`sqdist_atol`: ``|sqrt(a) - sqrt(b)| <= sqrt(|a - b|)`` always, and
    ``<= |a - b| / sqrt(b)`` away from 0; plus the square root's own rounding (``eps * d``).
    """
    e = sqdist_atol(x, c)
    d = exact.double()
    return torch.minimum(e.sqrt(), e / d.clamp_min(1e-300)) + EPS32 * d


def softmax_atol(logit_atol: float | torch.Tensor, num_classes: int) -> float | torch.Tensor:
    """Bound on the error of ``softmax(z)`` when every logit is off by at most ``logit_atol``:
    ``dp_k = p_k (dz_k - sum_j p_j dz_j)`` so ``|dp_k| <= 2 * logit_atol`` (first order, ``p_k <= 1``), plus
    the float32 softmax's own rounding (an exp per class and a ``K``-term sum)."""
    return 2 * logit_atol + sum_atol(num_classes + 2, 1.0)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: float | torch.Tensor, what: str = "") -> None:
    """``|actual - expected| <= atol`` elementwise (``atol`` broadcasts), with the worst offender named."""
    diff = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(diff)
    worst = int(torch.argmax(diff - bound))
    assert bool((diff <= bound).all()), (
        f"{what}: |diff| {float(diff.flatten()[worst]):.3g} > bound {float(bound.flatten()[worst]):.3g} "
        f"at flat index {worst}")
