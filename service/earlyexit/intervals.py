"""Confidence interval of an accuracy measured on ``n`` samples: the Wilson score interval.

For ``k`` correct out of ``n`` (``p = k / n``) and ``z`` the normal quantile (1.96 for 95 %)::

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    interval = [centre - half, centre + half]  (always inside [0, 1], unlike the normal approximation)
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """``(low, high)`` for an accuracy (fraction correct) over ``n >= 1`` independent samples."""
    if n < 1:
        raise ValueError("an interval needs at least one sample")
    p = min(1.0, max(0.0, float(accuracy)))
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
