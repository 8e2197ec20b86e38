"""Feature reduction applied before class means are taken and compared.

``full``: the flattened map ``(B, C*H*W)``, as in the paper. ``pool{g}`` (e.g. ``pool4``): adaptive
average pooling to ``g x g`` then flatten, ``(B, C*g*g)``. ``gap``: global average, ``(B, C)``.
Vectors ``(B, D)`` (logits, or already-flat features) pass through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("full", "gap", "pool2", "pool4", "pool8")


def _grid(reduction: str) -> int | None:
    if reduction == "full":
        return None
    if reduction == "gap":
        return 1
    if reduction.startswith("pool") and reduction[4:].isdigit() and int(reduction[4:]) > 0:
        return int(reduction[4:])
    raise ValueError(f"unknown feature reduction {reduction!r}; use full, gap or poolN")


def reduce_feature(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, D)`` float32 per the reduction; ``(B, D)`` is returned as float32."""
    if x.ndim == 2:
        return x.float()
    g = _grid(reduction)
    if g is not None and (x.shape[-2] > g or x.shape[-1] > g):
        x = F.adaptive_avg_pool2d(x, (min(g, x.shape[-2]), min(g, x.shape[-1])))
    return torch.flatten(x, 1).float()


def reduced_dim(shape: tuple[int, ...], reduction: str) -> int:
    """D for a feature of ``shape`` ``(C, H, W)`` (or ``(D,)``)."""
    if len(shape) == 1:
        return int(shape[0])
    c, h, w = shape
    g = _grid(reduction)
    if g is None:
        return c * h * w
    return c * min(g, h) * min(g, w)


def reduction_flops(shape: tuple[int, ...], reduction: str) -> int:
    """Adds spent by average pooling: one per input element when the map is pooled (0 for ``full``)."""
    if len(shape) == 1 or reduced_dim(shape, reduction) == int(torch.tensor(shape).prod()):
        return 0
    return int(torch.tensor(shape).prod())
