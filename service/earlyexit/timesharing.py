"""Route samples between two profiles so that a fraction ``lam`` goes to the first (time sharing)."""

from __future__ import annotations

import threading

import numpy as np


class TimeSharingRouter:
    """Deterministic error-diffusion routing: after ``n`` samples, the count sent to A is within 1 of
    ``lam * n`` (an RNG draw per sample only matches in expectation). Thread-safe.

    With ``seed`` set, routes by a seeded Bernoulli(lam) draw instead (unbiased, memoryless).
    """

    def __init__(self, lam: float, seed: int | None = None) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError("lam must be in [0, 1]")
        self.lam = lam
        self._credit = 0.0
        self._rng = np.random.default_rng(seed) if seed is not None else None
        self._lock = threading.Lock()

    def route(self, n: int) -> np.ndarray:
        """``n`` booleans: True sends that sample to profile A."""
        if self._rng is not None:
            with self._lock:
                return self._rng.random(n) < self.lam
        out = np.zeros(n, dtype=bool)
        with self._lock:
            for i in range(n):
                self._credit += self.lam
                if self._credit >= 1.0 - 1e-12:
                    self._credit -= 1.0
                    out[i] = True
        return out
