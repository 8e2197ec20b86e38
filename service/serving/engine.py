"""The inference engine: the network, the current snapshot, and the batches run on it.

An :class:`Engine` owns the network (loaded once) and a :class:`Snapshot`: the active bundle, its exit
runner, the operating point (one profile, or a time-shared mix of two), the version of ``active.json`` and
the autopilot configuration persisted with it. A snapshot is immutable. A request reads
``engine.snapshot`` once when it is admitted and is served entirely by it, so every response names exactly
one (bundle, profile, version) even while an operator switches. Switches are the state writer's
(:attr:`Engine.writer`, service/serving/state_writer.py): it validates, persists ``active.json`` under the
store's lock with a bumped version, and only then publishes the new snapshot here with one attribute
assignment (:meth:`Engine.publish`). A failed switch changes nothing.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.backbones import StagedNetwork
from service.backbones.preprocess import Normalizer
from service.earlyexit.modes import get_mode
from service.errors import ActiveStateError, ProfileNotFound, ServiceError
from service.serving.autopilot import parse_persisted
from service.serving.compiled import EngineBuildError
from service.serving.ic_serving import ICStore, load_ic_store
from service.serving.metrics import Metrics
from service.serving.outcomes import outcomes
from service.serving.runners import RunnerOptions, request_builds
from service.serving.snapshot import Catalog, InferenceOutcome, InferenceRequest, Snapshot, make_snapshot
from service.serving.state_writer import StateWriter, now_iso, operating_names
from service.serving.time_measure import serving_time_tables
from service.serving.time_profiles import retimed
from service.store.active import active_version, read_active_or_none
from service.store.atomic import sweep_tmp
from service.store.bundle_model import load_bundle
from service.store.bundles import BundleError, list_bundle_ids
from service.store.model_dir import ModelSpec, load_model

log = logging.getLogger("classmeans.engine")


class EngineLoadError(ServiceError, RuntimeError):
    """The model or every bundle failed to load: the process must not report ready."""

    code = "not_ready"
    status = 503


def _is_int(value: object) -> bool:
    try:
        int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return True


class Engine:
    """The network, the current :class:`Snapshot`, and inference on it; :attr:`writer` replaces the snapshot."""

    def __init__(self, model_dir: Path, spec: ModelSpec, net: StagedNetwork, snapshot: Snapshot,
                 metrics: Metrics | None = None, ic_store: ICStore | None = None,
                 runner_options: RunnerOptions | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.runner_options = runner_options or RunnerOptions()
        self.ic_store = ic_store or ICStore("absent")
        self.spec = spec
        self.net = net
        self.normalizer = Normalizer(spec.mean, spec.std)
        self.metrics = metrics
        self._snapshot = snapshot
        self.writer = StateWriter(self)
        if metrics is not None:
            metrics.configure_exits(net.num_exits)
            metrics.set_active(snapshot.bundle_id, snapshot.profile_name, snapshot.version)

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: Path, metrics: Metrics | None = None,
             runner_options: RunnerOptions | None = None) -> Engine:
        """Sweep temp leftovers, load the model, then the active bundle and operating point, run by the engine
        of ``runner_options`` (default: the torch reference engine; ``classmeans serve``: ``auto``).

        A corrupt active bundle falls back to the newest loadable one (logged as an error); with no
        loadable bundle at all, or an explicitly requested engine that cannot be built, raises
        :class:`EngineLoadError`.
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
        options = runner_options or RunnerOptions()
        try:
            snapshot = cls._initial_snapshot(model_dir, spec, net, ic_store, options)
        except EngineBuildError as exc:
            raise EngineLoadError(f"the {options.engine} engine cannot serve model {model_dir.name!r}: {exc}") from exc
        log.info("engine: %s", snapshot.catalog.engine_info)
        return cls(model_dir, spec, net, snapshot, metrics, ic_store, options)

    @staticmethod
    def _initial_snapshot(model_dir: Path, spec: ModelSpec, net: StagedNetwork,
                          ic_store: ICStore | None = None, options: RunnerOptions | None = None) -> Snapshot:
        store = ic_store or ICStore("absent")
        m = net.num_exits
        active = read_active_or_none(model_dir)
        if active is None and (model_dir / "active.json").exists():
            log.error("ACTIVE STATE UNREADABLE: %s/active.json is corrupt; falling back", model_dir)
        version = active_version(active)
        if version == 0 and not _is_int((active or {}).get("version", 0)):
            log.error("active.json has a malformed version %r; counting from 0", (active or {}).get("version"))
        failed: str | None = None
        if active is not None:
            try:
                bundle = load_bundle(model_dir, str(active["bundle"]), spec, m)
                catalog = Catalog.build(net, bundle, store.serving_for(net, bundle), options,
                                        warm=operating_names(active) or [bundle.default_profile])
                try:
                    operating = catalog.operating_from_json(active.get("operating", {"a": bundle.default_profile}))
                except (ActiveStateError, ProfileNotFound) as exc:
                    log.error("active operating point is invalid (%s); using profile %s", exc,
                              bundle.default_profile)
                    operating = catalog.operating(bundle.default_profile)
                autopilot, error = parse_persisted(active)
                return make_snapshot(catalog, operating, version, str(active.get("updated", "")),
                                     autopilot=autopilot, autopilot_error=error)
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
            catalog = Catalog.build(net, bundle, store.serving_for(net, bundle), options,
                                    warm=[bundle.default_profile])
            return make_snapshot(catalog, catalog.operating(bundle.default_profile), version, now_iso(),
                                 fallback_from=failed)
        why = f"active bundle {failed} is corrupt and no other bundle loads" if failed else "no bundle found"
        raise EngineLoadError(f"model {model_dir.name!r}: {why}; run `classmeans calibrate`")

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot; read it once per request."""
        return self._snapshot

    def publish(self, new: Snapshot, switch: str | None = None, quiet: bool = False) -> None:
        """Serve ``new`` from now on (the state writer's last step: one attribute assignment). ``switch``:
        ``"profile"`` or ``"bundle"``, counted; ``quiet``: an in-memory move, not reported as the active state."""
        self._snapshot = new
        if self.metrics is None or quiet:
            return
        self.metrics.set_active(new.bundle_id, new.profile_name, new.version)
        if switch == "profile":
            self.metrics.profile_switches.labels(self.metrics.model).inc()
        elif switch == "bundle":
            self.metrics.bundle_activations.labels(self.metrics.model).inc()

    def catalog_for(self, bundle_id: str, warm: Sequence[str] = ()) -> Catalog:
        """Load and validate bundle ``bundle_id`` fully and build what it serves (with the IC set, if it fits),
        on this process's engine; the sessions of the profiles in ``warm`` (default: the bundle's default
        profile) are built before it returns (an activation never makes a request wait for an export)."""
        bundle = load_bundle(self.model_dir, bundle_id, self.spec, self.net.num_exits)
        return Catalog.build(self.net, bundle, self.ic_store.serving_for(self.net, bundle), self.runner_options,
                             warm=list(warm) or [bundle.default_profile])

    def prebuild(self, names: Sequence[str]) -> int:
        """Build the compiled sessions of the serving bundle's profiles ``names`` in the background (unknown
        names are skipped); returns the number of segment keys asked for."""
        snap = self.snapshot
        return request_builds(snap.runner, [snap.policies[n] for n in names if n in snap.policies])

    def measure_time(self, batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 20) -> dict | None:
        """Re-measure the active bundle's time axis on this machine with the engine that serves it, and serve the
        re-costed profile times (in memory; ``timing.json`` is left as measured). Returns the new document, or
        None when the bundle has no stored exit shares (run ``classmeans timing`` once)."""
        snap = self._snapshot
        if snap.bundle.timing is None:
            log.warning("bundle %s has no timing.json: nothing to re-measure (run `classmeans timing`)",
                        snap.bundle_id)
            return None
        h, w = self.spec.input_size
        tables, _ = serving_time_tables(snap.runner, self.net, snap.bundle.heads, (3, h, w), batch_sizes, repeats)
        info = snap.catalog.engine_info
        doc = retimed(snap.bundle, tables, str(info.get("engine", "torch")), int(info.get("threads") or 1))
        if doc is not None:
            was = snap.bundle.timing.get("full_ms", {})
            snap.bundle.timing = doc
            log.info("time axis re-measured here: full network %s ms/sample by batch size (timing.json: %s)",
                     doc["full_ms"], was)
        return doc

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

    def _batch_input(self, requests: list[InferenceRequest]) -> torch.Tensor:
        """The batch ``x (B, 3, H, W)``: the requests' uint8 pixels joined first and normalised in one call
        (elementwise, so each row's values are those of normalising it alone; one call a request cost
        ~60 us of the inference thread each at 900 req/s), or their tensors (normalised) as given."""
        if all(r.pixels is not None for r in requests):
            pixels = [r.pixels for r in requests]
            return self.normalizer(np.concatenate(pixels) if len(pixels) > 1 else pixels[0])  # type: ignore[arg-type]
        parts = [self.normalizer(r.pixels) if r.pixels is not None else r.tensor for r in requests]
        return torch.cat(parts) if len(parts) > 1 else parts[0]  # type: ignore[arg-type]

    def _run_group(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        """One cascade run for requests of one snapshot: each row with the policy of its profile."""
        snap = requests[0].snapshot
        served = [name for r in requests for name in r.row_profiles()]
        x = self._batch_input(requests)
        policies = snap.policies
        one = served[0] if served.count(served[0]) == len(served) else None  # one profile: no per-row table
        t0 = time.perf_counter()
        res = snap.runner.run(x, policies[one] if one is not None else [policies[n] for n in served])
        seconds = time.perf_counter() - t0
        exits, flops, rules = res.exit_index.tolist(), res.flops.tolist(), res.rule_names()
        by_exit = snap.catalog.exit_members
        members = [by_exit[j] for j in exits] if by_exit is not None else None
        if self.metrics is not None:
            self.metrics.inference.labels(self.metrics.model).observe(seconds)
            self.metrics.batch_size.labels(self.metrics.model).observe(len(exits))
            self.metrics.observe_samples(served, exits, flops, snap.bundle.costs.full, rules=rules, members=members)
        return outcomes(requests, res, served, exits, flops, rules, self.spec.classes, seconds, members)
