"""Serving the internal-classifier (IC) decision modes beside the class-means bundle.

The engine loads the model's newest loadable IC set (``model_store/<model>/ics/<id>/``) once at start-up
(:func:`load_ic_store`, which never raises: a missing or broken IC set leaves the class-means service
as it was and says why in :meth:`ICStore.info`). For every snapshot it builds an :class:`ICServing`: an
:class:`~service.earlyexit.policy.ExitPolicy` per IC profile that can be served with the snapshot's
bundle; the snapshot's :class:`~service.serving.cascade.CascadeRunner` serves them beside the bundle's.

Modes and where their profiles come from:

* ``cm`` -- the bundle's own profiles (class means at every exit). The IC set's ``cm`` profiles (class means at
  the six IC exits only, kept in its ``profiles.json`` for the report and to seed ``combined``) are not
  served: the bundle's are at least as good.
* ``ic_prob`` (SDN), ``ic_entropy`` (BranchyNet) -- the IC set's profiles; no class means involved.
* ``combined`` -- the IC set's profiles, searched with the class means of one bundle
  (``profiles.json: bundle``); served only while that bundle is the serving one (thresholds tuned on one
  bundle's probabilities mean nothing on another's).

Each mode's ``full`` entry (every exit off: the plain network) is the bundle's ``full`` profile; it is not
listed again per mode but is the top vertex of every mode's hull when a target is chosen within a mode.

One batch may mix class-means and IC profiles (per-request overrides, a time-shared mix): each row
carries its profile's policy; each prediction names the rule that fired (``RULE_NAMES``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.backbones import StagedNetwork, StageProfile, profile_stages
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import Profile, upper_hull
from service.earlyexit.ic_rules import ICCosts, to_score_thresholds
from service.earlyexit.modes import BUNDLE_MODE, get_mode, ic_served_modes, is_mode, mode_names
from service.earlyexit.policy import ExitPolicy, ic_policy
from service.errors import ModeUnavailable, UnknownMode
from service.serving.ic_profiles import ICProfile, parse_ic_profiles
from service.serving.snapshot import FULL
from service.store.bundle_model import Bundle
from service.store.ic_sets import ICError, ic_costs, list_ics_ids, load_ics
from service.store.model_dir import ModelSpec

log = logging.getLogger("classmeans.ics")

CM = BUNDLE_MODE  # the mode of the bundle's own profiles


def check_mode(mode: str | None) -> None:
    """422 ``unknown_mode`` for a mode that is not in the decision-mode table."""
    if mode is not None and not is_mode(mode):
        raise UnknownMode(f"unknown decision mode {mode!r}; use one of {', '.join(mode_names())}")


@dataclass(frozen=True)
class ICServing:
    """What one bundle serves with the IC set: its IC profiles and their policies by name, the modes
    served, and why the others are not."""

    ics_id: str
    ics: ICSet
    costs: ICCosts
    num_exits: int
    profiles: dict[str, ICProfile]
    policies: dict[str, ExitPolicy]
    modes: tuple[str, ...]
    unavailable: dict[str, str]

    def expected_flops(self, name: str, exit_index: int) -> float | None:
        """FLOPs of a sample of IC profile ``name`` that left at backbone exit ``exit_index``, from the
        offline cascade cost model (not the runner's running sum); None where it cannot leave."""
        p = self.profiles.get(name)
        if p is None:
            return None
        exits = list(self.ics.exits)
        last = self.num_exits - 1
        if exit_index != last and exit_index not in exits:
            return None
        e = len(exits) if exit_index == last else exits.index(exit_index)
        disable = get_mode(p.mode).disabled_score
        per_exit = self.costs.cascade(p.mode).per_exit(to_score_thresholds(p.mode, p.tensor), disable)
        return float(per_exit[0, e])


@dataclass
class ICStore:
    """The IC set found at start-up (or why there is none), shared by every snapshot."""

    status: str  # "absent" | "loaded" | "failed"
    ics_id: str | None = None
    ics: ICSet | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stage_profile: StageProfile | None = None
    bundle: str | None = None
    profiles: dict[str, list[ICProfile]] = field(default_factory=dict)
    error: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    def info(self, serving: ICServing | None = None) -> dict[str, Any]:
        """For ``/profiles``, ``/v2/models/{m}`` and the index: what is loaded, what serves, and why not."""
        out: dict[str, Any] = {"status": self.status, "id": self.ics_id}
        if self.error:
            out["error"] = self.error
        if self.skipped:
            out["skipped"] = self.skipped
        if self.ics is not None:
            out["exits"] = list(self.ics.exits)
            out["profiles_bundle"] = self.bundle
        out["modes"] = [CM, *(serving.modes if serving is not None else ())]
        if serving is not None and serving.unavailable:
            out["unavailable"] = dict(serving.unavailable)
        elif serving is None and self.status == "loaded":
            out["unavailable"] = {m: "the IC set could not be used with the serving bundle"
                                  for m in ic_served_modes()}
        return out

    def serving_for(self, net: StagedNetwork, bundle: Bundle) -> ICServing | None:
        """The IC runner and profiles for ``bundle`` (``None`` without a usable IC set)."""
        if self.ics is None or self.stage_profile is None or self.ics_id is None:
            return None
        try:
            return self._serving(net, bundle)
        except (ValueError, KeyError) as exc:  # a bundle that does not fit: log, serve class means only
            log.error("IC set %s cannot serve with bundle %s: %s", self.ics_id, bundle.bundle_id, exc)
            return None

    def _serving(self, net: StagedNetwork, bundle: Bundle) -> ICServing:
        assert self.ics is not None and self.stage_profile is not None and self.ics_id is not None
        exits = self.ics.exits
        for e in exits:
            want, got = float(self.stage_profile.cumulative[e]), float(bundle.costs.backbone_cum[e])
            if abs(want - got) > 1e-6 * max(1.0, want):
                raise ValueError(f"backbone FLOPs at exit {e} differ: IC set {want}, bundle {got}")
        unavailable: dict[str, str] = {}
        modes = [m for m in ic_served_modes() if self.profiles.get(m)]
        for m in ic_served_modes():
            if m not in modes:
                unavailable[m] = f"IC set {self.ics_id} has no {m} profiles"
        heads = None
        with_cm = [m for m in modes if get_mode(m).needs_cm]  # modes that read the serving bundle's class means
        if with_cm:
            missing = [e for e in exits if e not in bundle.heads]
            why = None
            if self.bundle != bundle.bundle_id:
                why = (f"its thresholds were searched with the class means of bundle "
                       f"{self.bundle}; the serving bundle is {bundle.bundle_id}")
            elif missing:
                why = f"the serving bundle has no class means at exits {missing}"
            else:
                heads = {e: bundle.heads[e] for e in exits}
            if why is not None:
                for m in with_cm:
                    unavailable[m] = why
                    modes.remove(m)
        costs: ICCosts = ic_costs(self.stage_profile, self.ics, heads)
        taken = set(bundle.profile_names())
        profiles: dict[str, ICProfile] = {}
        policies: dict[str, ExitPolicy] = {}
        for m in modes:
            for p in self.profiles[m]:
                if p.name in taken:
                    log.warning("IC profile %s is shadowed by the bundle's profile of that name", p.name)
                    continue
                profiles[p.name] = p
                policies[p.name] = ic_policy(p.name, p.mode, p.tensor, exits, costs, bundle.costs.backbone_cum)
        return ICServing(self.ics_id, self.ics, costs, net.num_exits, profiles, policies, tuple(modes),
                         unavailable)


def load_ic_store(model_dir: Path, spec: ModelSpec, net: StagedNetwork) -> ICStore:
    """The newest IC set of ``model_dir`` that loads and validates (weights, shapes, tensors, profiles).

    Never raises: with no IC set the status is ``absent``; when every IC set fails, ``failed`` with the
    reason (logged as an error). The class-means service starts either way.
    """
    try:
        ids = list_ics_ids(model_dir)
    except OSError as exc:
        log.error("cannot list IC sets of %s: %s; serving class means only", model_dir, exc)
        return ICStore("failed", error=f"cannot list IC sets: {exc}")
    if not ids:
        return ICStore("absent")
    try:
        stage_profile = profile_stages(net)
    except Exception as exc:  # FLOPs counting of a user backbone: never block start-up
        log.error("cannot count backbone FLOPs for the ICs: %s; serving class means only", exc)
        return ICStore("failed", error=f"cannot count backbone FLOPs: {exc}")
    skipped: list[dict[str, str]] = []
    for ics_id in reversed(ids):
        try:
            ics, meta, stored = load_ics(model_dir, spec, stage_profile, ics_id)
            bundle, profiles = (None, {}) if stored is None else parse_ic_profiles(
                stored, len(ics), float(stage_profile.total))
        except (ICError, OSError, ValueError, TypeError, KeyError) as exc:
            log.error("IC SET %s DOES NOT LOAD (%s)", ics_id, exc)
            skipped.append({"id": ics_id, "error": str(exc)})
            continue
        if stored is None:
            log.warning("IC set %s has no profiles.json: no IC mode to serve", ics_id)
        if skipped:
            log.error("serving the older IC set %s", ics_id)
        return ICStore("loaded", ics_id, ics, meta, stage_profile, bundle, profiles, skipped=skipped)
    log.error("no IC set loads; serving class-means profiles only")
    return ICStore("failed", error=skipped[0]["error"], skipped=skipped)


def mode_candidates(bundle: Bundle, ic: ICServing | None, mode: str) -> list[Profile]:
    """The hull of one mode as :class:`Profile` objects: the bundle's profiles for ``cm``; the IC
    profiles of ``mode`` plus the plain network (``full``) otherwise. 409 ``mode_unavailable`` when the
    mode cannot be served now."""
    check_mode(mode)
    if get_mode(mode).from_bundle:
        return list(bundle.profiles)
    if ic is None or mode not in ic.modes:
        why = (ic.unavailable.get(mode) if ic is not None else None) or "no internal classifiers are loaded"
        raise ModeUnavailable(f"mode {mode!r} is not available: {why}")
    out = [p.as_profile() for p in ic.profiles.values() if p.mode == mode]
    if FULL in bundle.profile_names():
        out.append(bundle.profile(FULL))
    keep = upper_hull(np.array([p.flops for p in out]), np.array([p.accuracy for p in out]))
    return [out[i] for i in keep]  # the plain network joins only where it is on the mode's hull


def profile_rows(bundle: Bundle, ic: ICServing | None) -> list[tuple[str, str, Any, list[int] | None, Profile]]:
    """Every servable profile as (name, mode, thresholds, exits the thresholds apply to, Profile)."""
    rows: list[tuple[str, str, Any, list[int] | None, Profile]] = [
        (p.name, CM, list(p.thresholds), None, p) for p in bundle.profiles]
    if ic is not None:
        exits = list(ic.ics.exits)
        rows += [(p.name, p.mode, p.thresholds, exits, p.as_profile()) for p in ic.profiles.values()]
    return rows

