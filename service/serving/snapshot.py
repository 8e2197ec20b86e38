"""The serving state as an immutable value, and the requests and answers that pass through it.

A :class:`Catalog` is what one bundle (plus the IC set, when one serves with it) offers: every servable
profile as an :class:`~service.earlyexit.policy.ExitPolicy` for the one
:class:`~service.serving.cascade.CascadeRunner`, with its offline FLOPs and accuracy. A
:class:`Snapshot` is (catalog, operating point, version, the autopilot configuration persisted with that
version); the engine publishes a new one on every switch (service/serving/state_writer.py).
An :class:`InferenceRequest` carries the snapshot it was admitted under, so it is served entirely by that
state even if a switch happens while it waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.backbones import StagedNetwork
from service.earlyexit import Operating, Profile, TimeSharingRouter
from service.earlyexit.policy import ExitPolicy, class_means_policy
from service.errors import ActiveStateError, ProfileNotFound
from service.serving.cascade import CascadeRunner
from service.serving.compiled import CompiledCascadeRunner
from service.serving.model_cascade_runner import ModelCascadeRunner
from service.serving.runners import RunnerOptions, make_runner
from service.store.bundle_model import Bundle

if TYPE_CHECKING:
    from service.serving.autopilot import AutopilotConfig
    from service.serving.ic_serving import ICServing

FULL = "full"  # the profile name reported when exits are switched off for a request


@dataclass(frozen=True)
class Catalog:
    """Every profile one bundle (and its IC set) serves: ``policies`` and ``profiles`` by name, bundle
    profiles first (``full`` among them), then the IC profiles; the runner that serves them all."""

    bundle: Bundle
    runner: CascadeRunner | CompiledCascadeRunner | ModelCascadeRunner
    policies: dict[str, ExitPolicy] = field(repr=False)
    profiles: dict[str, Profile] = field(repr=False)
    ic: ICServing | None = None  # the IC set's profiles and why some modes are unavailable, when loaded
    engine_info: dict[str, Any] = field(default_factory=dict, repr=False)  # which engine runs it, and why
    exit_members: tuple[str, ...] | None = field(default=None, repr=False)  # a cascade: the member of each exit

    @classmethod
    def build(cls, net: StagedNetwork, bundle: Bundle, ic: ICServing | None = None,
              options: RunnerOptions | None = None, warm: Sequence[str] = ()) -> Catalog:
        """Every profile as a policy, and the runner of ``options`` (:mod:`service.serving.runners`): the
        sessions of the profiles in ``warm`` (and ``full``) are built now, the bundle's other profiles' in the
        background."""
        policies = {p.name: class_means_policy(p.name, p.thresholds, bundle.costs) for p in bundle.profiles}
        policies.setdefault(FULL, class_means_policy(FULL, [1.0] * (bundle.num_exits - 1), bundle.costs))
        profiles = {p.name: p for p in bundle.profiles}
        bundle_policies = list(policies.values())
        if ic is not None:
            for name, ip in ic.profiles.items():
                policies[name] = ic.policies[name]
                profiles[name] = ip.as_profile()
        now = [policies[n] for n in dict.fromkeys([*warm, FULL]) if n in policies]
        runner, info = make_runner(options or RunnerOptions(), net, bundle.heads, ic.ics if ic is not None else None,
                                   now, bundle_policies)
        members = (tuple(n.split("/", 1)[0] for n in bundle.exit_names)  # exits named "<member>/<exit>"
                   if bundle.meta.get("members") else None)
        return cls(bundle, runner, policies, profiles, ic, info, members)

    def mode_of(self, name: str) -> str:
        return self.policies[name].mode

    def engine_state(self) -> dict[str, Any]:
        """Which engine runs this catalog and why (fallback reason), with the compiled engine's live counters
        (sessions built, building, batches re-run on the reference engine)."""
        out = dict(self.engine_info)
        if isinstance(self.runner, CompiledCascadeRunner | ModelCascadeRunner):
            out.update(self.runner.info())
        return out

    def operating(self, name: str) -> Operating:
        """The operating point that serves profile ``name`` alone."""
        p = self._profile(name)
        return Operating(p.name, flops_fraction=p.flops_fraction, accuracy=p.accuracy)

    def _profile(self, name: str) -> Profile:
        p = self.profiles.get(name)
        if p is None:
            raise ProfileNotFound(f"profile {name!r} is not in bundle {self.bundle.bundle_id} "
                                  f"(have: {', '.join(self.policies)})")
        return p

    def operating_from_json(self, obj: Any) -> Operating:
        """``{"a": name}`` or ``{"a": name, "b": name, "lam": x}`` -> :class:`Operating` (validated)."""
        if not isinstance(obj, dict) or "a" not in obj:
            raise ActiveStateError("operating point must name profile 'a'")
        a, b = str(obj["a"]), obj.get("b")
        if a not in self.profiles or (b is not None and str(b) not in self.profiles):
            raise ProfileNotFound(f"operating point {obj!r} names a profile not in bundle {self.bundle.bundle_id}")
        if b is None:
            return self.operating(a)
        try:
            lam = float(obj.get("lam", 1.0))
        except (TypeError, ValueError):
            raise ActiveStateError(f"operating point lam {obj.get('lam')!r} is not a number") from None
        if not 0.0 <= lam <= 1.0:
            raise ActiveStateError(f"operating point lam {lam} is outside [0, 1]")
        pa, pb = self._profile(a), self._profile(str(b))
        return Operating(a, str(b), lam, lam * pa.flops_fraction + (1 - lam) * pb.flops_fraction,
                         lam * pa.accuracy + (1 - lam) * pb.accuracy)


@dataclass(frozen=True)
class Snapshot:
    """What serves now. Never mutated: a switch publishes a new one."""

    catalog: Catalog
    operating: Operating
    router: TimeSharingRouter | None
    version: int
    updated: str
    fallback_from: str | None = None
    # The autopilot configuration persisted with this version (parsed once, where active.json is adopted),
    # or why the persisted one is unusable; None/None: the autopilot is off.
    autopilot: AutopilotConfig | None = None
    autopilot_error: str | None = None
    # From the catalog, for the many readers: the bundle, its id, the runner, the policies, the IC set.
    bundle: Bundle = field(init=False, repr=False)
    bundle_id: str = field(init=False)
    runner: CascadeRunner | CompiledCascadeRunner | ModelCascadeRunner = field(init=False, repr=False)
    policies: dict[str, ExitPolicy] = field(init=False, repr=False)
    ic: ICServing | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        c = self.catalog
        for name, value in (("bundle", c.bundle), ("bundle_id", c.bundle.bundle_id), ("runner", c.runner),
                            ("policies", c.policies), ("ic", c.ic)):
            object.__setattr__(self, name, value)

    @property
    def profile_name(self) -> str:
        """The operating point's name: a profile, or ``a~b@lam`` for a time-shared mix."""
        return self.operating.name

    def has_profile(self, name: str) -> bool:
        return name in self.catalog.policies

    def profile_names(self) -> list[str]:
        """Every profile a request may name: the bundle's, then the IC profiles."""
        return list(self.catalog.policies)

    def mode_of(self, name: str) -> str:
        return self.catalog.mode_of(name)

    def operating_json(self) -> dict[str, Any]:
        op = self.operating
        out: dict[str, Any] = {"a": op.a}
        if op.b is not None:
            out.update({"b": op.b, "lam": op.lam})
        return out


def make_snapshot(catalog: Catalog, op: Operating, version: int, updated: str, fallback_from: str | None = None,
                  autopilot: AutopilotConfig | None = None, autopilot_error: str | None = None) -> Snapshot:
    router = TimeSharingRouter(op.lam) if op.b is not None else None
    return Snapshot(catalog, op, router, version, updated, fallback_from, autopilot, autopilot_error)


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

    def row_profiles(self) -> list[str]:
        """The profile of each sample: the override, ``full``, or the operating point (a time-shared mix
        routes each sample to one of its two profiles)."""
        n = self.size
        if self.exits_off:
            return [FULL] * n
        if self.profile is not None:
            return [self.profile] * n
        op, router = self.snapshot.operating, self.snapshot.router
        if op.b is None or router is None:
            return [op.a] * n
        return [op.a if a else op.b for a in router.route(n)]


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
    rule: str = "final"  # which rule let it out (RULE_NAMES: cm, ic, ic+cm, final)
    mode: str = "cm"  # the decision mode of its profile
    member: str | None = None  # the cascade member that answered (None: one network)


@dataclass
class InferenceOutcome:
    predictions: list[SamplePrediction]
    inference_seconds: float
