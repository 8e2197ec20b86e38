"""From normalised distances to class probabilities (Eq. 4-5).

The paper prints ``p = softmax(-1 / d)``, which would rank the *farthest* class first; the authors'
code uses ``softmax(-d / n)``. We implement the code's version, with an optional temperature ``tau``:

    p_j^k = exp(-(d_j^k / n_j^k) / tau) / sum_k' exp(-(d_j^k' / n_j^k') / tau)

``n_j^k`` (Eq. 4) is the mean of ``d_j^k`` over **all** calibration samples, not only those of class k.
"""

from __future__ import annotations

import torch


def class_probabilities(distances: torch.Tensor, normaliser: torch.Tensor, temperature: float = 1.0
                        ) -> torch.Tensor:
    """``(B, K)`` distances and ``(K,)`` normalisers -> ``(B, K)`` probabilities (rows sum to 1)."""
    return probabilities_from_coefficients(distances, probability_coefficients(normaliser, temperature))


def probability_coefficients(normaliser: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(K,)`` normalisers -> ``(K,)`` factors ``a_k = -1 / (n_k * tau)``, so Eq. 4-5 is ``softmax(a * d)``.

    Computed once per exit head: at serving time Eq. 4-5 then costs one multiply and one softmax.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    return -1.0 / (normaliser.to(torch.float32) * temperature)


def probabilities_from_coefficients(distances: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``softmax(a * d)`` over classes: ``(B, K)`` distances, ``(K,)`` factors from
    :func:`probability_coefficients` -> ``(B, K)`` probabilities (what :func:`class_probabilities` returns)."""
    return torch.softmax(distances * coefficients, dim=1)


def top_probability(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K)`` -> (top probability ``(B,)``, predicted class ``(B,)``); the prediction is the nearest mean."""
    conf, pred = probs.max(dim=1)
    return conf, pred


def exits_here(top_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. 6-7: a sample leaves at this exit when ``max_k p^k > T`` (strict); ``T >= 1`` never fires."""
    if threshold >= 1.0:
        return torch.zeros_like(top_prob, dtype=torch.bool)
    return top_prob > threshold
