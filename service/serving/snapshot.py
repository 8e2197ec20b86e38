"""The serving state as an immutable value, and the requests and answers that pass through it.

A :class:`Snapshot` is one (bundle, exit runner, operating point, version); the engine publishes a new one
on every switch. An :class:`InferenceRequest` carries the snapshot it was admitted
under, so it is served entirely by that state even if a switch happens while it waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.backbones import StagedNetwork
from service.earlyexit import Operating, TimeSharingRouter
from service.serving.runner import ExitRunner
from service.store.bundle_model import Bundle
from service.store.bundles import BundleError

if TYPE_CHECKING:
    from service.serving.ic_serving import ICServing

FULL = "full"  # the profile name reported when exits are switched off for a request


@dataclass(frozen=True)
class Snapshot:
    """What serves now. Never mutated: a switch publishes a new one."""

    bundle: Bundle
    runner: ExitRunner
    operating: Operating
    router: TimeSharingRouter | None
    version: int
    updated: str
    thresholds: dict[str, torch.Tensor] = field(repr=False)
    fallback_from: str | None = None
    ic: ICServing | None = None  # the IC runner and IC profiles (service.serving.ic_serving), when loaded

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def profile_name(self) -> str:
        """The operating point's name: a profile, or ``a~b@lam`` for a time-shared mix."""
        return self.operating.name

    def has_profile(self, name: str) -> bool:
        return name in self.thresholds or (self.ic is not None and name in self.ic.profiles)

    def profile_names(self) -> list[str]:
        """Every profile a request may name: the bundle's, then the IC profiles."""
        return [*self.thresholds, *(self.ic.profiles if self.ic is not None else ())]

    def operating_json(self) -> dict[str, Any]:
        op = self.operating
        out: dict[str, Any] = {"a": op.a}
        if op.b is not None:
            out.update({"b": op.b, "lam": op.lam})
        return out


def bundle_thresholds(bundle: Bundle) -> dict[str, torch.Tensor]:
    t = {p.name: torch.tensor(p.thresholds, dtype=torch.float32) for p in bundle.profiles}
    t.setdefault(FULL, torch.ones(bundle.num_exits - 1, dtype=torch.float32))
    return t


def single_operating(bundle: Bundle, name: str, ic: ICServing | None = None) -> Operating:
    if ic is not None and name in ic.profiles and name not in bundle.profile_names():
        return ic.profiles[name].operating()
    p = bundle.profile(name)
    return Operating(p.name, flops_fraction=p.flops_fraction, accuracy=p.accuracy)


def operating_from_json(bundle: Bundle, obj: Any, ic: ICServing | None = None) -> Operating:
    """``{"a": name}`` or ``{"a": name, "b": name, "lam": x}`` -> :class:`Operating` (validated)."""
    if not isinstance(obj, dict) or "a" not in obj:
        raise BundleError("operating point must name profile 'a'", code="invalid_active")
    names = set(bundle.profile_names()) | set(ic.profiles if ic is not None else ())
    a, b = str(obj["a"]), obj.get("b")
    if a not in names or (b is not None and str(b) not in names):
        raise BundleError(f"operating point {obj!r} names a profile not in bundle {bundle.bundle_id}",
                          code="profile_not_found")
    if b is None:
        return single_operating(bundle, a, ic)
    try:
        lam = float(obj.get("lam", 1.0))
    except (TypeError, ValueError):
        raise BundleError(f"operating point lam {obj.get('lam')!r} is not a number", code="invalid_active") from None
    if not 0.0 <= lam <= 1.0:
        raise BundleError(f"operating point lam {lam} is outside [0, 1]", code="invalid_active")
    pa, pb = _profile(bundle, a, ic), _profile(bundle, str(b), ic)
    return Operating(a, str(b), lam, lam * pa.flops_fraction + (1 - lam) * pb.flops_fraction,
                     lam * pa.accuracy + (1 - lam) * pb.accuracy)


def _profile(bundle: Bundle, name: str, ic: ICServing | None) -> Any:
    if ic is not None and name in ic.profiles and name not in bundle.profile_names():
        return ic.profiles[name]
    return bundle.profile(name)


@dataclass
class InferenceRequest:
    """One request's samples for the batcher: uint8 ``pixels (n, H, W, 3)`` or a normalised
    ``tensor (n, 3, H, W)``; ``profile`` overrides the operating point, ``exits_off`` forces the full net."""

    snapshot: Snapshot
    pixels: np.ndarray | None = None
    tensor: torch.Tensor | None = None
    profile: str | None = None
    exits_off: bool = False
    top_k: int = 5

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0] if self.pixels is not None else self.tensor.shape[0])  # type: ignore[union-attr]

    @property
    def served_as(self) -> str:
        """The profile name this request reports: the override, ``full``, or the operating point."""
        if self.exits_off:
            return FULL
        return self.profile or self.snapshot.profile_name


@dataclass
class SamplePrediction:
    class_index: int
    label: str
    confidence: float
    top_k: list[tuple[int, str, float]]
    exit_index: int
    exit_name: str
    flops: float
    profile: str
    rule: str = ""  # which rule let it out (RULE_NAMES); "" = class means: "cm", or "final" at the head
    mode: str = "cm"  # the decision mode of its profile


@dataclass
class InferenceOutcome:
    predictions: list[SamplePrediction]
    inference_seconds: float


def make_snapshot(net: StagedNetwork, bundle: Bundle, op: Operating, version: int, updated: str,
                   runner: ExitRunner | None = None, thresholds: dict[str, torch.Tensor] | None = None,
                   fallback_from: str | None = None, ic: ICServing | None = None) -> Snapshot:
    router = TimeSharingRouter(op.lam) if op.b is not None else None
    return Snapshot(bundle, runner or ExitRunner(net, bundle.heads, bundle.costs), op, router, version, updated,
                    thresholds if thresholds is not None else bundle_thresholds(bundle), fallback_from, ic)
