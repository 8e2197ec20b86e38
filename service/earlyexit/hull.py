"""Operating points: the upper convex hull of the FLOPs-accuracy cloud, and time sharing between them.

A *profile* is a hull vertex (one threshold vector). Any point on a hull segment between two adjacent
vertices A and B is reached by *time sharing*: send a fraction ``lam`` of the samples to A and the rest
to B; expected FLOPs and accuracy are the convex mix ``lam * A + (1 - lam) * B``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceError


@dataclass
class Profile:
    """A hull vertex. ``thresholds``: ``M-1`` values, ``>= 1`` disables an exit."""

    name: str
    thresholds: list[float]
    flops: float
    flops_fraction: float
    accuracy: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "thresholds": [round(float(t), 6) for t in self.thresholds],
                "flops": float(self.flops), "flops_fraction": float(self.flops_fraction),
                "accuracy": float(self.accuracy), **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_json(cls, obj: dict) -> Profile:
        return cls(name=str(obj["name"]), thresholds=[float(t) for t in obj["thresholds"]],
                   flops=float(obj["flops"]), flops_fraction=float(obj["flops_fraction"]),
                   accuracy=float(obj["accuracy"]), extra=dict(obj.get("extra", {})))


@dataclass(frozen=True)
class Operating:
    """What serves: profile ``a`` alone (``b is None``), or ``a`` with probability ``lam`` else ``b``."""

    a: str
    b: str | None = None
    lam: float = 1.0
    flops_fraction: float = 1.0
    accuracy: float = 0.0

    @property
    def name(self) -> str:
        return self.a if self.b is None else f"{self.a}~{self.b}@{self.lam:.4f}"


def upper_hull(flops: np.ndarray, acc: np.ndarray) -> list[int]:
    """Indices of the upper-left convex hull vertices, sorted by increasing FLOPs (and accuracy).

    Keeps only the concave, accuracy-increasing chain (the Pareto part of the upper hull): a point is
    a vertex when no mix of two other points gives at least its accuracy for at most its FLOPs.
    Unlike ``scipy.spatial.ConvexHull``, the lower chain is never returned.
    """
    flops, acc = np.asarray(flops, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    order = np.lexsort((-acc, flops))  # by FLOPs, then best accuracy first
    pareto: list[int] = []
    best = -np.inf
    for i in order:
        if acc[i] > best:
            pareto.append(int(i))
            best = acc[i]
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (flops[a] - flops[o]) * (acc[i] - acc[o]) - (acc[a] - acc[o]) * (flops[i] - flops[o])
            if cross >= 0:  # a lies on or below the segment o -> i: not a vertex of the concave chain
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


class TargetUnreachable(ServiceError, ValueError):
    """No point on the hull meets the requested target."""

    code = "target_unreachable"
    status = 422


def select_by_target(profiles: list[Profile], min_accuracy: float | None = None,
                     max_flops_fraction: float | None = None) -> Operating:
    """The operating point for a target, on the hull polyline of ``profiles`` (sorted by FLOPs).

    ``min_accuracy``: the cheapest point with accuracy ``>= a``. ``max_flops_fraction``: the most accurate
    point with FLOPs fraction ``<= f``. Between two vertices the answer is their time-shared mix.
    """
    if (min_accuracy is None) == (max_flops_fraction is None):
        raise ValueError("give exactly one of min_accuracy, max_flops_fraction")
    ps = sorted(profiles, key=lambda p: p.flops_fraction)
    if min_accuracy is not None:
        key, target = (lambda p: p.accuracy), float(min_accuracy)
        if target > max(p.accuracy for p in ps) + 1e-12:
            raise TargetUnreachable(f"no profile reaches accuracy {target:.4f} (best {ps[-1].accuracy:.4f})")
    else:
        key, target = (lambda p: p.flops_fraction), float(max_flops_fraction)  # type: ignore[arg-type]
        if target < ps[0].flops_fraction - 1e-12:
            raise TargetUnreachable(
                f"no profile costs at most {target:.4f} of the FLOPs (cheapest {ps[0].flops_fraction:.4f})")
    if min_accuracy is not None:
        for p in ps:
            if p.accuracy >= target - 1e-12:
                hit = p
                break
        prev = ps[ps.index(hit) - 1] if ps.index(hit) > 0 else None
        if prev is None or abs(hit.accuracy - target) < 1e-12:
            return Operating(hit.name, flops_fraction=hit.flops_fraction, accuracy=hit.accuracy)
        lam = (key(hit) - target) / (key(hit) - key(prev))
    else:
        hit = ps[-1]
        for p in ps:
            if p.flops_fraction > target + 1e-12:
                hit = p
                break
        else:
            return Operating(hit.name, flops_fraction=hit.flops_fraction, accuracy=hit.accuracy)
        prev = ps[ps.index(hit) - 1]
        if abs(prev.flops_fraction - target) < 1e-12:
            return Operating(prev.name, flops_fraction=prev.flops_fraction, accuracy=prev.accuracy)
        lam = (key(hit) - target) / (key(hit) - key(prev))
    lam = float(min(1.0, max(0.0, lam)))
    return Operating(prev.name, hit.name, lam,
                     flops_fraction=lam * prev.flops_fraction + (1 - lam) * hit.flops_fraction,
                     accuracy=lam * prev.accuracy + (1 - lam) * hit.accuracy)
