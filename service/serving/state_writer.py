"""The state writer: every change of what a process serves, and the one compare-and-swap behind the persisted ones.

Writers (profile switch, target switch, bundle activation, the autopilot's configuration) validate everything,
then :meth:`StateWriter._persist`: under the store's writer lock (:func:`~service.store.active.update_active`) read
the stored ``active.json``, refuse a profile switch computed against a bundle that another process has
activated since (``active_conflict``, 409) instead of undoing that activation, write the new state with a
version above every stored one, and only then publish the new snapshot (:meth:`Engine.publish`, one
attribute assignment). A failed switch changes nothing. Versions come from the store
(:func:`~service.store.active.active_version`); the snapshot carries the one it was published at.

Two changes write nothing: :meth:`adopt` serves a newer state another process wrote (the follower calls it,
service/serving/follower.py), :meth:`move_operating` is the autopilot's in-memory move (the version stays).
Every persisted switch writes ``active.json`` without the ``"autopilot"`` key, which turns the autopilot off;
:meth:`persist_autopilot` writes it. The configuration is parsed once, here, into the snapshot
(:attr:`Snapshot.autopilot`), where the autopilot reads it.

The same methods serve the HTTP admin plane, the control plane and any other caller; nothing here knows HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.earlyexit import Operating, select_by_target
from service.earlyexit.hull import TargetUnreachable
from service.earlyexit.modes import BUNDLE_MODE
from service.earlyexit.time_axis import select_by_time
from service.errors import ModeMismatch
from service.serving.autopilot import AutopilotConfig, parse_persisted
from service.serving.ic_serving import check_mode, mode_candidates
from service.serving.snapshot import FULL, Catalog, Snapshot, make_snapshot
from service.serving.time_profiles import require_time_axis, time_fractions
from service.store.active import active_version, update_active
from service.store.bundles import BundleError

if TYPE_CHECKING:
    from service.serving.engine import Engine

log = logging.getLogger("classmeans.engine")


def operating_names(active: dict[str, Any] | None) -> list[str]:
    """The profile names an ``active.json`` operating point serves (its ``a`` and ``b``; none when absent)."""
    op = (active or {}).get("operating")
    return [str(op[k]) for k in ("a", "b") if isinstance(op, dict) and op.get(k) is not None]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StateWriter:
    """The operations that replace an :class:`~service.serving.engine.Engine`'s snapshot (one per engine)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_dir: Path = engine.model_dir
        self._lock = threading.Lock()

    # -- persisted switches (admin) --------------------------------------------------------------------

    def switch_profile(self, name: str, mode: str | None = None) -> Snapshot:
        """Serve profile ``name`` (of the active bundle, or an IC profile) from now on (persisted).
        ``mode``, when given, must be the profile's mode."""
        check_mode(mode)
        with self._lock:
            snap = self.engine.snapshot
            op = snap.catalog.operating(name)  # ProfileNotFound (404) for a name it does not serve
            have = snap.mode_of(name)
            if mode is not None and mode != have and name != FULL:
                raise ModeMismatch(f"profile {name!r} is a {have} profile, not {mode}")
            return self._persist(snap.catalog, op, switch="profile")

    def switch_target(self, min_accuracy: float | None = None,
                      max_flops_fraction: float | None = None, mode: str | None = None) -> Snapshot:
        """Serve the hull point for a target (maybe a time-shared mix of two profiles) within ``mode``
        (default ``cm``: the bundle's profiles); raises :class:`~service.earlyexit.hull.TargetUnreachable`
        when no point meets it."""
        check_mode(mode)
        with self._lock:
            snap = self.engine.snapshot
            op = select_by_target(mode_candidates(snap.bundle, snap.ic, mode or BUNDLE_MODE),
                                  min_accuracy=min_accuracy, max_flops_fraction=max_flops_fraction)
            return self._persist(snap.catalog, op, switch="profile")

    def switch_time(self, max_latency_ms: float | None = None, max_time_fraction: float | None = None) -> Snapshot:
        """Serve the most accurate point of the bundle's accuracy-time hull whose expected time per sample at
        batch 1 is at most ``max_latency_ms`` (or ``max_time_fraction`` of the full network's), maybe a
        time-shared mix; :class:`~service.serving.time_profiles.NoTimeAxis` when the bundle was never timed,
        :class:`~service.earlyexit.hull.TargetUnreachable` when no point is that fast."""
        if (max_latency_ms is None) == (max_time_fraction is None):
            raise ValueError("give exactly one of max_latency_ms, max_time_fraction")
        with self._lock:
            snap = self.engine.snapshot
            full = require_time_axis(snap.bundle)
            target = max_time_fraction if max_time_fraction is not None else float(max_latency_ms) / full
            fractions = time_fractions(snap.bundle)
            try:
                op = select_by_time(snap.bundle.profiles, fractions, target)
            except TargetUnreachable as exc:
                if max_latency_ms is None:
                    raise
                fastest = min(fractions.values()) * full
                raise TargetUnreachable(f"no point serves within {max_latency_ms:g} ms per sample at batch 1 on "
                                        f"this machine (fastest {fastest:.3g} ms, full network {full:.3g} ms)"
                                        ) from exc
            return self._persist(snap.catalog, op, switch="profile")

    def activate_bundle(self, bundle_id: str, profile: str | None = None) -> Snapshot:
        """Load and validate bundle ``bundle_id`` fully, then serve it (its default profile unless named)."""
        catalog = self.engine.catalog_for(bundle_id, warm=[profile] if profile else [])
        op = catalog.operating(profile or catalog.bundle.default_profile)
        with self._lock:
            return self._persist(catalog, op, switch="bundle")

    def persist_autopilot(self, config: AutopilotConfig | dict[str, Any]) -> Snapshot:
        """Persist the autopilot configuration as ``active.json``'s ``"autopilot"`` key (version + 1) with the
        operating point serving now; every other persisted switch writes ``active.json`` without the key,
        which turns the autopilot off."""
        cfg = config if isinstance(config, AutopilotConfig) else AutopilotConfig.from_json(config)
        with self._lock:
            old = self.engine.snapshot
            new = self._persist(old.catalog, old.operating, autopilot=cfg)
            log.info("autopilot %s persisted (version %d)", cfg.to_json(), new.version)
            return new

    def _persist(self, catalog: Catalog, op: Operating, switch: str | None = None,
                 autopilot: AutopilotConfig | None = None) -> Snapshot:
        """The one compare-and-swap of ``active.json`` (see the module docstring), then the swap. Caller holds
        the lock. ``switch``: ``"profile"`` or ``"bundle"`` (counted in the metrics; a bundle activation may
        replace a bundle activated elsewhere, nothing else may)."""
        old = self.engine.snapshot
        made: list[Snapshot] = []

        def decide(stored: dict[str, Any] | None, base: int) -> dict[str, Any]:
            if (stored is not None and base > old.version and switch != "bundle"
                    and str(stored.get("bundle")) != old.bundle_id):
                raise BundleError(f"bundle {stored.get('bundle')} was activated elsewhere (version {base}) while "
                                  f"this process served {old.bundle_id}; retry the switch", code="active_conflict")
            new = make_snapshot(catalog, op, max(base, old.version) + 1, now_iso(), autopilot=autopilot)
            made.append(new)
            out = {"bundle": catalog.bundle.bundle_id, "operating": new.operating_json(), "version": new.version,
                   "updated": new.updated}
            if autopilot is not None:
                out["autopilot"] = autopilot.to_json()
            return out

        update_active(self.model_dir, decide)  # under the store's writer lock, versions only grow
        new = made[-1]
        self.engine.publish(new, switch=switch)
        if autopilot is None:
            log.info("now serving bundle %s, profile %s (version %d)", new.bundle_id, new.profile_name,
                     new.version)
        return new

    # -- following the store (service/serving/follower.py) ---------------------------------------------

    def adopt(self, active: dict[str, Any]) -> bool:
        """Serve the state another process wrote to ``active.json`` if its version is newer than ours;
        writes nothing. Returns whether the snapshot was swapped. Raises a :class:`ServiceError` (a
        :class:`BundleError`, :class:`ProfileNotFound`, :class:`ActiveStateError`) when the named bundle or
        operating point does not load (the current snapshot keeps serving)."""
        version, bundle_id = active_version(active), str(active.get("bundle", ""))
        old = self.engine.snapshot
        if version <= old.version:
            return False
        catalog = (old.catalog if bundle_id == old.bundle_id
                   else self.engine.catalog_for(bundle_id, warm=operating_names(active)))
        operating = catalog.operating_from_json(active.get("operating", {"a": catalog.bundle.default_profile}))
        autopilot, error = parse_persisted(active)
        new = make_snapshot(catalog, operating, version, str(active.get("updated", "")), autopilot=autopilot,
                            autopilot_error=error)
        with self._lock:
            if version <= self.engine.snapshot.version:
                return False
            self.engine.publish(new)
        log.info("following the store: bundle %s, profile %s (version %d)", new.bundle_id, new.profile_name,
                 version)
        return True

    # -- the autopilot's in-memory move (service/serving/autopilot_runtime.py) --------------------------

    def move_operating(self, budget: float, mode: str, version: int, axis: str = "flops") -> Snapshot | None:
        """In-memory move (the autopilot): serve the hull point for a budget WITHOUT writing ``active.json``;
        the version (and the autopilot configuration) stays. ``axis`` ``"flops"``: ``budget`` is a FLOPs
        fraction on ``mode``'s hull; ``"time"``: a fraction of the full network's measured time at batch 1 on
        the bundle's accuracy-time hull (:func:`~service.earlyexit.time_axis.select_by_time`). Returns None,
        changing nothing, when the state is no longer at ``version`` (a persisted switch won)."""
        with self._lock:
            snap = self.engine.snapshot
            if snap.version != version:
                return None
            if axis == "time":
                op = select_by_time(snap.bundle.profiles, time_fractions(snap.bundle), budget)
            else:
                op = select_by_target(mode_candidates(snap.bundle, snap.ic, mode), max_flops_fraction=budget)
            if op == snap.operating:
                return snap
            new = make_snapshot(snap.catalog, op, snap.version, snap.updated, snap.fallback_from,
                                autopilot=snap.autopilot, autopilot_error=snap.autopilot_error)
            self.engine.publish(new, quiet=True)
            return new
