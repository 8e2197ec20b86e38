"""Serving the internal-classifier (IC) decision modes beside the class-means bundle.

The engine loads the model's newest loadable IC set (``model_store/<model>/ics/<id>/``) once at start-up
(:func:`load_ic_store`, which never raises: a missing or broken IC set leaves the class-means service
as it was and says why in :meth:`ICStore.info`). For every snapshot it builds an :class:`ICServing`: an
:class:`~service.serving.ic_runner.ICExitRunner` over the same network and the snapshot's bundle, plus
the IC profiles that can be served with that bundle.

Modes and where their profiles come from:

* ``cm`` -- the bundle's own profiles (class means at every exit), served by the
  :class:`~service.serving.runner.ExitRunner` as before. The IC set's ``cm`` profiles (class means at
  the six IC exits only, kept in its ``profiles.json`` for the report and to seed ``combined``) are not
  served: the bundle's are at least as good.
* ``ic_prob`` (SDN), ``ic_entropy`` (BranchyNet) -- the IC set's profiles; no class means involved.
* ``combined`` -- the IC set's profiles, searched with the class means of one bundle
  (``profiles.json: bundle``); served only while that bundle is the serving one (thresholds tuned on one
  bundle's probabilities mean nothing on another's).

Each mode's ``full`` entry (every exit off: the plain network) is the bundle's ``full`` profile; it is not
listed again per mode but is the top vertex of every mode's hull when a target is chosen within a mode.

Rows are routed per profile: one batch may mix class-means and IC profiles (per-request overrides, a
time-shared mix); each prediction names the rule that fired (:data:`RULE_NAMES`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.backbones import StagedNetwork, StageProfile, profile_stages
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import Operating, Profile, upper_hull
from service.earlyexit.ic_rules import MODES, RULE_NAMES, ICCosts, to_score_thresholds
from service.serving.ic_runner import ICExitRunner, row_thresholds
from service.serving.snapshot import FULL, InferenceOutcome, InferenceRequest, SamplePrediction
from service.store.bundle_model import Bundle
from service.store.bundles import BundleError
from service.store.ic_sets import ICError, ic_costs, list_ics_ids, load_ics
from service.store.model_dir import ModelSpec

if TYPE_CHECKING:
    from service.serving.engine import Engine

log = logging.getLogger("classmeans.ics")

CM = "cm"
IC_SERVED_MODES = ("ic_prob", "ic_entropy", "combined")
PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,79}$")
_FINAL = RULE_NAMES.index("final")


def rule_for_cm_exit(exit_index: int, num_exits: int) -> str:
    """The rule of a class-means (``cm`` mode) prediction: ``cm`` at an early exit, ``final`` at the head."""
    return "final" if exit_index >= num_exits - 1 else "cm"


def check_mode(mode: str | None) -> None:
    """422 ``unknown_mode`` for a mode that is not one of :data:`MODES`."""
    if mode is not None and mode not in MODES:
        raise BundleError(f"unknown decision mode {mode!r}; use one of {', '.join(MODES)}", code="unknown_mode")


@dataclass(frozen=True)
class ICProfile:
    """One servable IC hull vertex. ``thresholds``: ``E`` values (``{"ic": [...], "cm": [...]}`` for
    ``combined``) at the IC exits; ``row``: the ``(2, E)`` layout :class:`ICExitRunner` takes."""

    name: str
    mode: str
    thresholds: list[float] | dict[str, list[float]]
    row: torch.Tensor = field(repr=False)
    flops: float
    flops_fraction: float
    accuracy: float

    def as_profile(self) -> Profile:
        """A :class:`Profile` for :func:`~service.earlyexit.select_by_target` (thresholds are not read)."""
        return Profile(self.name, [], self.flops, self.flops_fraction, self.accuracy, {"mode": self.mode})

    def operating(self) -> Operating:
        return Operating(self.name, flops_fraction=self.flops_fraction, accuracy=self.accuracy)


def _floats(values: Any, n: int, what: str) -> list[float]:
    if not isinstance(values, list) or len(values) != n:
        raise ICError(f"{what}: needs {n} thresholds")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ICError(f"{what}: non-finite threshold")
    return out


def parse_ic_profiles(stored: Any, num_ic: int, flops_full: float) -> tuple[str | None, dict[str, list[ICProfile]]]:
    """Validate an IC set's ``profiles.json`` -> (the bundle its class-means modes used, servable profiles
    per IC mode). Raises :class:`ICError` on anything malformed."""
    if not isinstance(stored, dict) or not isinstance(stored.get("modes"), dict):
        raise ICError("profiles.json must be an object with 'modes'")
    bundle = stored.get("bundle")
    if bundle is not None and not isinstance(bundle, str):
        raise ICError("profiles.json: 'bundle' must be a bundle id or null")
    out: dict[str, list[ICProfile]] = {}
    seen: set[str] = set()
    for mode, entries in stored["modes"].items():
        if mode not in MODES:
            raise ICError(f"profiles.json: unknown mode {mode!r}")
        if not isinstance(entries, list):
            raise ICError(f"profiles.json: mode {mode} must list profiles")
        if mode not in IC_SERVED_MODES:
            continue
        plist = []
        for p in entries:
            try:
                name, pmode = str(p["name"]), str(p["mode"])
                what = f"profiles.json: {mode} profile {name!r}"
                if pmode != mode:
                    raise ICError(f"{what} says mode {pmode!r}")
                if not PROFILE_NAME_RE.match(name):
                    raise ICError(f"{what}: invalid name")
                flops, frac, acc = float(p["flops"]), float(p["flops_fraction"]), float(p["accuracy"])
                if not (math.isfinite(flops) and flops > 0 and 0.0 <= acc <= 1.0
                        and abs(frac - flops / flops_full) <= 1e-6 * max(1.0, frac)):
                    raise ICError(f"{what}: FLOPs or accuracy out of range")
                raw = p["thresholds"]
                if mode == "combined":
                    if not isinstance(raw, dict):
                        raise ICError(f"{what}: combined thresholds must be {{'ic': [...], 'cm': [...]}}")
                    thr: list[float] | dict[str, list[float]] = {
                        "ic": _floats(raw.get("ic"), num_ic, what), "cm": _floats(raw.get("cm"), num_ic, what)}
                    t = torch.tensor([thr["ic"], thr["cm"]], dtype=torch.float32)
                else:
                    thr = _floats(raw, num_ic, what)
                    t = torch.tensor(thr, dtype=torch.float32)
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, ICError):
                    raise
                raise ICError(f"profiles.json: malformed {mode} profile: {exc!r}") from exc
            if name == FULL:
                continue  # the plain network: served as the bundle's "full"
            if name in seen:
                raise ICError(f"profiles.json: profile name {name!r} appears twice")
            seen.add(name)
            plist.append(ICProfile(name, mode, thr, row_thresholds(mode, t), flops, frac, acc))
        out[mode] = sorted(plist, key=lambda q: q.flops)
    return bundle, out


@dataclass(frozen=True)
class ICServing:
    """What one snapshot serves with ICs: the runner over its bundle and the IC profiles by name."""

    ics_id: str
    runner: ICExitRunner
    profiles: dict[str, ICProfile]
    modes: tuple[str, ...]
    unavailable: dict[str, str]

    def serves_any(self, requests: Sequence[InferenceRequest]) -> bool:
        """Whether any request of a batch group may be served by an IC profile."""
        p = self.profiles
        for r in requests:
            if r.exits_off:
                continue
            if r.profile is not None:
                if r.profile in p:
                    return True
                continue
            op = r.snapshot.operating
            if op.a in p or (op.b is not None and op.b in p):
                return True
        return False

    def mode_of(self, name: str) -> str:
        ip = self.profiles.get(name)
        return ip.mode if ip is not None else CM

    def expected_flops(self, name: str, exit_index: int) -> float | None:
        """FLOPs of a sample of IC profile ``name`` that left at backbone exit ``exit_index``, from the
        offline cascade cost model (not the runner's running sum); None where it cannot leave."""
        p = self.profiles.get(name)
        if p is None:
            return None
        exits = list(self.runner.ics.exits)
        last = self.runner.net.num_exits - 1
        if exit_index != last and exit_index not in exits:
            return None
        e = len(exits) if exit_index == last else exits.index(exit_index)
        if p.mode == "combined":
            assert isinstance(p.thresholds, dict)
            t = torch.tensor([p.thresholds["ic"], p.thresholds["cm"]])
            disable: tuple[float, ...] = (1.0, 1.0)
        else:
            t = torch.tensor(p.thresholds)
            disable = (0.0,) if p.mode == "ic_entropy" else (1.0,)
        per_exit = self.runner.costs.cascade(p.mode).per_exit(to_score_thresholds(p.mode, t), disable)
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
            out["unavailable"] = {m: "the IC set could not be used with the serving bundle" for m in IC_SERVED_MODES}
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
        modes = [m for m in IC_SERVED_MODES if self.profiles.get(m)]
        for m in IC_SERVED_MODES:
            if m not in modes:
                unavailable[m] = f"IC set {self.ics_id} has no {m} profiles"
        heads = None
        if "combined" in modes:
            missing = [e for e in exits if e not in bundle.heads]
            if self.bundle != bundle.bundle_id:
                unavailable["combined"] = (f"its thresholds were searched with the class means of bundle "
                                           f"{self.bundle}; the serving bundle is {bundle.bundle_id}")
            elif missing:
                unavailable["combined"] = f"the serving bundle has no class means at exits {missing}"
            else:
                heads = {e: bundle.heads[e] for e in exits}
            if heads is None:
                modes.remove("combined")
        costs: ICCosts = ic_costs(self.stage_profile, self.ics, heads)
        runner = ICExitRunner(net, self.ics, costs, heads)
        taken = set(bundle.profile_names())
        profiles: dict[str, ICProfile] = {}
        for m in modes:
            for p in self.profiles[m]:
                if p.name in taken:
                    log.warning("IC profile %s is shadowed by the bundle's profile of that name", p.name)
                    continue
                profiles[p.name] = p
        return ICServing(self.ics_id, runner, profiles, tuple(modes), unavailable)


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


# ---------------------------------------------------------------------------------------- inference


def warm_up_ic(engine: Engine, x: torch.Tensor) -> None:
    """Run one profile of each IC mode of the current snapshot on ``x`` (normalised): the code paths of
    every mode, without paying for each of the ~100 profiles at start-up."""
    ic = engine.snapshot.ic
    if ic is None:
        return
    done: set[str] = set()
    for p in ic.profiles.values():
        if p.mode not in done:
            ic.runner.run(x, p.mode, p.row)
            done.add(p.mode)


def run_ic_group(engine: Engine, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
    """:meth:`Engine._run_group` for a group in which some rows are served by IC profiles.

    Rows of class-means profiles go through the snapshot's :class:`ExitRunner`, rows of IC profiles
    through its :class:`ICExitRunner`; both report backbone exit indices, FLOPs including every head
    consulted, and the rule that fired.
    """
    import time

    snap = requests[0].snapshot
    ic = snap.ic
    assert ic is not None
    parts, served = [], []
    for r in requests:
        parts.append(engine.normalizer(r.pixels) if r.pixels is not None else r.tensor)
        served.extend(engine._row_profiles(r, r.size))
    x = torch.cat(parts) if len(parts) > 1 else parts[0]
    n = len(served)
    is_ic = [name in ic.profiles for name in served]
    ic_idx = [i for i in range(n) if is_ic[i]]
    cm_idx = [i for i in range(n) if not is_ic[i]]
    m = snap.bundle.num_exits
    k = engine.spec.num_classes
    exits = [0] * n
    preds = [0] * n
    confs = [0.0] * n
    flops = [0.0] * n
    rules = [""] * n
    probs = torch.zeros(n, k, dtype=torch.float32)
    t0 = time.perf_counter()
    if cm_idx:
        res = snap.runner.run(x[cm_idx], torch.stack([snap.thresholds[served[i]] for i in cm_idx]))
        for q, i in enumerate(cm_idx):
            exits[i] = int(res.exit_index[q])
            rules[i] = rule_for_cm_exit(exits[i], m)
        probs[cm_idx] = res.probs.float()
        _scatter(cm_idx, res.pred.tolist(), preds)
        _scatter(cm_idx, res.confidence.tolist(), confs)
        _scatter(cm_idx, res.flops.tolist(), flops)
    if ic_idx:
        rows = [ic.profiles[served[i]] for i in ic_idx]
        res_ic = ic.runner.run(x[ic_idx], [p.mode for p in rows], torch.stack([p.row for p in rows]))
        _scatter(ic_idx, res_ic.exit_stage.tolist(), exits)
        _scatter(ic_idx, res_ic.rule_names(), rules)
        probs[ic_idx] = res_ic.probs
        _scatter(ic_idx, res_ic.pred.tolist(), preds)
        _scatter(ic_idx, res_ic.confidence.tolist(), confs)
        _scatter(ic_idx, res_ic.flops.tolist(), flops)
    seconds = time.perf_counter() - t0
    full = snap.bundle.costs.full
    if engine.metrics is not None:
        engine.metrics.inference.labels(engine.metrics.model).observe(seconds)
        engine.metrics.batch_size.labels(engine.metrics.model).observe(n)
        engine.metrics.observe_samples(served, exits, flops, full, rules=rules)
    k_max = max(min(r.top_k, k) for r in requests)
    top_p, top_i = torch.topk(probs, k_max, dim=1)
    top_p_l, top_i_l = top_p.tolist(), top_i.tolist()
    classes, names = engine.spec.classes, snap.bundle.exit_names
    outcomes, lo = [], 0
    for r in requests:
        kk = min(r.top_k, k)
        samples = []
        for j in range(lo, lo + r.size):
            samples.append(SamplePrediction(
                preds[j], classes[preds[j]], confs[j],
                [(top_i_l[j][q], classes[top_i_l[j][q]], top_p_l[j][q]) for q in range(kk)],
                exits[j], names[exits[j]], flops[j], served[j], rule=rules[j], mode=ic.mode_of(served[j])))
        outcomes.append(InferenceOutcome(samples, seconds))
        lo += r.size
    return outcomes


def _scatter(idx: list[int], values: list[Any], out: list[Any]) -> None:
    for i, v in zip(idx, values, strict=True):
        out[i] = v


def mode_candidates(bundle: Bundle, ic: ICServing | None, mode: str) -> list[Profile]:
    """The hull of one mode as :class:`Profile` objects: the bundle's profiles for ``cm``; the IC
    profiles of ``mode`` plus the plain network (``full``) otherwise. 409 ``mode_unavailable`` when the
    mode cannot be served now."""
    check_mode(mode)
    if mode == CM:
        return list(bundle.profiles)
    if ic is None or mode not in ic.modes:
        why = (ic.unavailable.get(mode) if ic is not None else None) or "no internal classifiers are loaded"
        raise BundleError(f"mode {mode!r} is not available: {why}", code="mode_unavailable")
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
        exits = list(ic.runner.ics.exits)
        rows += [(p.name, p.mode, p.thresholds, exits, p.as_profile()) for p in ic.profiles.values()]
    return rows

