"""The loaded serving state and its atomic swaps.

An :class:`Engine` owns the network (loaded once) and a :class:`Snapshot`: the active bundle, its exit
runner, the operating point (one profile, or a time-shared mix of two) and the version of ``active.json``.
A snapshot is immutable. A request reads ``engine.snapshot`` once when it is admitted and is served
entirely by it, so every response names exactly one (bundle, profile, version) even while an operator
switches. Writers (profile switch, bundle activation) take a lock, validate everything, persist
``active.json`` atomically with a bumped version, and only then publish the new snapshot with one
attribute assignment. A failed switch changes nothing.

The same methods serve the HTTP admin plane and any other caller; nothing here knows about HTTP.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.backbones import StagedNetwork
from service.backbones.preprocess import Normalizer
from service.earlyexit import Operating, select_by_target
from service.earlyexit.modes import BUNDLE_MODE, get_mode
from service.errors import ActiveStateError, ModeMismatch, ProfileNotFound, ServiceError
from service.serving.ic_serving import ICStore, check_mode, load_ic_store, mode_candidates
from service.serving.metrics import Metrics
from service.serving.outcomes import outcomes
from service.serving.snapshot import FULL, Catalog, InferenceOutcome, InferenceRequest, Snapshot, make_snapshot
from service.store.active import read_active_or_none, update_active
from service.store.atomic import sweep_tmp
from service.store.bundle_model import load_bundle
from service.store.bundles import BundleError, bundle_path, list_bundle_ids
from service.store.model_dir import ModelSpec, load_model

log = logging.getLogger("classmeans.engine")


class EngineLoadError(ServiceError, RuntimeError):
    """The model or every bundle failed to load: the process must not report ready."""

    code = "not_ready"
    status = 503


def _version(active: dict[str, Any] | None) -> int:
    try:
        return max(0, int((active or {}).get("version", 0)))
    except (TypeError, ValueError):
        log.error("active.json has a malformed version %r; counting from 0", (active or {}).get("version"))
        return 0


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Engine:
    """The network, the current :class:`Snapshot`, and the operations that replace it."""

    def __init__(self, model_dir: Path, spec: ModelSpec, net: StagedNetwork, snapshot: Snapshot,
                 metrics: Metrics | None = None, ic_store: ICStore | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.ic_store = ic_store or ICStore("absent")
        self.spec = spec
        self.net = net
        self.normalizer = Normalizer(spec.mean, spec.std)
        self.metrics = metrics
        self._snapshot = snapshot
        self._lock = threading.Lock()
        if metrics is not None:
            metrics.configure_exits(net.num_exits)
            metrics.set_active(snapshot.bundle_id, snapshot.profile_name, snapshot.version)

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: Path, metrics: Metrics | None = None) -> Engine:
        """Sweep temp leftovers, load the model, then the active bundle and operating point.

        A corrupt active bundle falls back to the newest loadable one (logged as an error); with no
        loadable bundle at all, raises :class:`EngineLoadError`.
        """
        model_dir = Path(model_dir)
        if not (model_dir / "model.json").is_file():
            raise EngineLoadError(f"model {model_dir.name!r} not found in {model_dir.parent}")
        removed = sweep_tmp(model_dir)
        if removed:
            log.warning("removed %d leftover temporary file(s) under %s", len(removed), model_dir)
        try:
            spec, net = load_model(model_dir)
        except Exception as exc:
            raise EngineLoadError(f"cannot load model {model_dir.name!r}: {exc}") from exc
        ic_store = load_ic_store(model_dir, spec, net)  # never raises: a broken IC set leaves class means serving
        snapshot = cls._initial_snapshot(model_dir, spec, net, ic_store)
        return cls(model_dir, spec, net, snapshot, metrics, ic_store)

    @staticmethod
    def _initial_snapshot(model_dir: Path, spec: ModelSpec, net: StagedNetwork,
                          ic_store: ICStore | None = None) -> Snapshot:
        store = ic_store or ICStore("absent")
        m = net.num_exits
        active = read_active_or_none(model_dir)
        if active is None and (model_dir / "active.json").exists():
            log.error("ACTIVE STATE UNREADABLE: %s/active.json is corrupt; falling back", model_dir)
        version = _version(active)
        failed: str | None = None
        if active is not None:
            try:
                bundle = load_bundle(model_dir, str(active["bundle"]), spec, m)
                catalog = Catalog.build(net, bundle, store.serving_for(net, bundle))
                try:
                    operating = catalog.operating_from_json(active.get("operating", {"a": bundle.default_profile}))
                except (ActiveStateError, ProfileNotFound) as exc:
                    log.error("active operating point is invalid (%s); using profile %s", exc,
                              bundle.default_profile)
                    operating = catalog.operating(bundle.default_profile)
                return make_snapshot(catalog, operating, version, str(active.get("updated", "")))
            except BundleError as exc:
                failed = str(active["bundle"])
                log.error("ACTIVE BUNDLE %s DOES NOT LOAD (%s); falling back to the newest loadable bundle",
                          failed, exc)
        for bid in reversed(list_bundle_ids(model_dir)):
            if bid == failed:
                continue
            try:
                bundle = load_bundle(model_dir, bid, spec, m)
            except BundleError as exc:
                log.error("bundle %s does not load either: %s", bid, exc)
                continue
            if failed:
                log.error("SERVING FALLBACK BUNDLE %s instead of %s", bid, failed)
            catalog = Catalog.build(net, bundle, store.serving_for(net, bundle))
            return make_snapshot(catalog, catalog.operating(bundle.default_profile), version, _now_iso(),
                                 fallback_from=failed)
        why = f"active bundle {failed} is corrupt and no other bundle loads" if failed else "no bundle found"
        raise EngineLoadError(f"model {model_dir.name!r}: {why}; run `classmeans calibrate`")

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot; read it once per request."""
        return self._snapshot

    # -- switching (admin) -------------------------------------------------------------------------------

    def switch_profile(self, name: str, mode: str | None = None) -> Snapshot:
        """Serve profile ``name`` (of the active bundle, or an IC profile) from now on (persisted).
        ``mode``, when given, must be the profile's mode."""
        check_mode(mode)
        with self._lock:
            snap = self._snapshot
            op = snap.catalog.operating(name)  # ProfileNotFound (404) for a name it does not serve
            have = snap.mode_of(name)
            if mode is not None and mode != have and name != FULL:
                raise ModeMismatch(f"profile {name!r} is a {have} profile, not {mode}")
            return self._publish(snap.catalog, op, profile_switch=True)

    def switch_target(self, min_accuracy: float | None = None,
                      max_flops_fraction: float | None = None, mode: str | None = None) -> Snapshot:
        """Serve the hull point for a target (maybe a time-shared mix of two profiles) within ``mode``
        (default ``cm``: the bundle's profiles); raises :class:`~service.earlyexit.hull.TargetUnreachable`
        when no point meets it."""
        check_mode(mode)
        with self._lock:
            snap = self._snapshot
            op = select_by_target(mode_candidates(snap.bundle, snap.ic, mode or BUNDLE_MODE), min_accuracy=min_accuracy,
                                  max_flops_fraction=max_flops_fraction)
            return self._publish(snap.catalog, op, profile_switch=True)

    def activate_bundle(self, bundle_id: str, profile: str | None = None) -> Snapshot:
        """Load and validate bundle ``bundle_id`` fully, then serve it (its default profile unless named)."""
        bundle = load_bundle(self.model_dir, bundle_id, self.spec, self.net.num_exits)
        catalog = Catalog.build(self.net, bundle, self.ic_store.serving_for(self.net, bundle))
        op = catalog.operating(profile or bundle.default_profile)
        with self._lock:
            return self._publish(catalog, op, bundle_activation=True)

    def _publish(self, catalog: Catalog, op: Operating, profile_switch: bool = False,
                 bundle_activation: bool = False) -> Snapshot:
        """Compare-and-swap ``active.json`` under the store's writer lock (a version above every stored one),
        then swap the snapshot. Caller holds the lock. A profile switch computed against a bundle that another
        process has replaced since is refused (``active_conflict``, 409) instead of undoing that activation."""
        old = self._snapshot
        made: list[Snapshot] = []

        def decide(stored: dict[str, Any] | None, base: int) -> dict[str, Any]:
            if (stored is not None and base > old.version and not bundle_activation
                    and str(stored.get("bundle")) != old.bundle_id):
                raise BundleError(f"bundle {stored.get('bundle')} was activated elsewhere (version {base}) while "
                                  f"this process served {old.bundle_id}; retry the switch", code="active_conflict")
            new = make_snapshot(catalog, op, max(base, old.version) + 1, _now_iso())
            made.append(new)
            return {"bundle": catalog.bundle.bundle_id, "operating": new.operating_json(), "version": new.version,
                    "updated": new.updated}

        update_active(self.model_dir, decide)
        new = made[-1]
        self._snapshot = new
        log.info("now serving bundle %s, profile %s (version %d)", new.bundle_id, new.profile_name, new.version)
        if self.metrics is not None:
            self.metrics.set_active(new.bundle_id, new.profile_name, new.version)
            if profile_switch:
                self.metrics.profile_switches.labels(self.metrics.model).inc()
            if bundle_activation:
                self.metrics.bundle_activations.labels(self.metrics.model).inc()
        return new

    # -- following the store (service/serving/follower.py) -----------------------------------------------

    def adopt(self, active: dict[str, Any]) -> bool:
        """Serve the state another process wrote to ``active.json`` if its version is newer than ours;
        writes nothing. Returns whether the snapshot was swapped. Raises a :class:`ServiceError` (a
        :class:`BundleError`, :class:`ProfileNotFound`, :class:`ActiveStateError`) when the named bundle or
        operating point does not load (the current snapshot keeps serving)."""
        version, bundle_id = _version(active), str(active.get("bundle", ""))
        old = self._snapshot
        if version <= old.version:
            return False
        if bundle_id == old.bundle_id:
            catalog = old.catalog
        else:
            bundle = load_bundle(self.model_dir, bundle_id, self.spec, self.net.num_exits)
            catalog = Catalog.build(self.net, bundle, self.ic_store.serving_for(self.net, bundle))
        operating = catalog.operating_from_json(active.get("operating", {"a": catalog.bundle.default_profile}))
        new = make_snapshot(catalog, operating, version, str(active.get("updated", "")))
        with self._lock:
            if version <= self._snapshot.version:
                return False
            self._snapshot = new
        log.info("following the store: bundle %s, profile %s (version %d)", new.bundle_id, new.profile_name,
                 version)
        if self.metrics is not None:
            self.metrics.set_active(new.bundle_id, new.profile_name, version)
        return True

    # -- autopilot (service/serving/autopilot_runtime.py) ------------------------------------------------

    def move_operating(self, max_flops_fraction: float, mode: str, version: int) -> Snapshot | None:
        """In-memory move (the autopilot): serve the hull point for a FLOPs budget WITHOUT writing
        ``active.json``; the version stays. Returns None, changing nothing, when the state is no longer at
        ``version`` (a persisted switch won)."""
        with self._lock:
            snap = self._snapshot
            if snap.version != version:
                return None
            op = select_by_target(mode_candidates(snap.bundle, snap.ic, mode), max_flops_fraction=max_flops_fraction)
            if op == snap.operating:
                return snap
            self._snapshot = make_snapshot(snap.catalog, op, snap.version, snap.updated, snap.fallback_from)
            return self._snapshot

    def persist_autopilot(self, config: dict[str, Any]) -> Snapshot:
        """Persist the autopilot configuration as ``active.json``'s ``"autopilot"`` key (version + 1) with the
        operating point serving now; every other persisted switch writes ``active.json`` without the key,
        which turns the autopilot off."""
        with self._lock:
            old = self._snapshot
            made: list[Snapshot] = []

            def decide(stored: dict[str, Any] | None, base: int) -> dict[str, Any]:
                if stored is not None and base > old.version and str(stored.get("bundle")) != old.bundle_id:
                    raise BundleError(f"bundle {stored.get('bundle')} was activated elsewhere (version {base}); "
                                      "retry", code="active_conflict")
                new = make_snapshot(old.catalog, old.operating, max(base, old.version) + 1, _now_iso())
                made.append(new)
                return {"bundle": new.bundle_id, "operating": new.operating_json(), "version": new.version,
                        "updated": new.updated, "autopilot": config}

            update_active(self.model_dir, decide)  # under the store's writer lock, versions only grow
            new = made[-1]
            self._snapshot = new
            log.info("autopilot %s persisted (version %d)", config, new.version)
            if self.metrics is not None:
                self.metrics.set_active(new.bundle_id, new.profile_name, new.version)
            return new

    # -- inference (worker thread) -----------------------------------------------------------------------

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run every class-means profile of the active bundle and one profile of each other mode once on
        blank images, so the first request is not slow (not all ~100 IC profiles: their code paths)."""
        snap = self._snapshot
        h, w = self.spec.input_size
        policies, seen = [], set()
        for p in snap.policies.values():
            if get_mode(p.mode).from_bundle or p.mode not in seen:
                policies.append(p)
                seen.add(p.mode)
        for b in batch_sizes:
            x = self.normalizer(np.zeros((b, h, w, 3), dtype=np.uint8))
            for policy in policies:
                snap.runner.run(x, policy)

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome | Exception]:
        """Run the requests of one batch; requests admitted under different snapshots run separately."""
        out: list[InferenceOutcome | Exception | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(id(r.snapshot), []).append(i)
        for idx in groups.values():
            try:
                results = self._run_group([requests[i] for i in idx])
            except Exception as exc:
                log.exception("inference failed for %d request(s)", len(idx))
                results = [exc] * len(idx)
            for i, res in zip(idx, results, strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    def _run_group(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        """One cascade run for requests of one snapshot: each row with the policy of its profile."""
        snap = requests[0].snapshot
        parts, served = [], []
        for r in requests:
            parts.append(self.normalizer(r.pixels) if r.pixels is not None else r.tensor)
            served.extend(r.row_profiles())
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        policies = snap.policies
        one = served[0] if served.count(served[0]) == len(served) else None  # one profile: no per-row table
        t0 = time.perf_counter()
        res = snap.runner.run(x, policies[one] if one is not None else [policies[n] for n in served])
        seconds = time.perf_counter() - t0
        exits, flops, rules = res.exit_index.tolist(), res.flops.tolist(), res.rule_names()
        if self.metrics is not None:
            self.metrics.inference.labels(self.metrics.model).observe(seconds)
            self.metrics.batch_size.labels(self.metrics.model).observe(len(exits))
            self.metrics.observe_samples(served, exits, flops, snap.bundle.costs.full, rules=rules)
        return outcomes(requests, res, served, exits, flops, rules, self.spec.classes, seconds)

    # -- listing -----------------------------------------------------------------------------------------

    def bundle_summaries(self) -> list[dict[str, Any]]:
        """Every bundle in the store (oldest first) with its headline numbers; the serving one marked."""
        snap = self._snapshot
        out = []
        for bid in list_bundle_ids(self.model_dir):
            path = bundle_path(self.model_dir, bid)
            entry: dict[str, Any] = {"id": bid, "active": bid == snap.bundle_id}
            try:
                meta = json.loads((path / "bundle.json").read_text())
                profiles = json.loads((path / "profiles.json").read_text())
                heads = (meta.get("config") or {}).get("heads") or [{}]
                entry.update({"default_profile": profiles.get("default"),
                              "profiles": [p.get("name") for p in profiles.get("profiles", [])],
                              "heads": heads[0], "num_means": (meta.get("config") or {}).get("num_means"),
                              "num_selection": (meta.get("config") or {}).get("num_selection"),
                              "readable": True})
                report = path / "report.json"
                if report.is_file():
                    entry["headline"] = json.loads(report.read_text()).get("headline")
            except (OSError, ValueError, AttributeError, TypeError):
                entry["readable"] = False
            out.append(entry)
        return out
