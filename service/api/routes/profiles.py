"""``GET /profiles`` (public) and ``POST /profiles`` (admin): list and switch the operating point."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from service.api import schemas
from service.api.auth import require_admin
from service.api.deps import EngineDep, StateDep
from service.api.errors import ApiError
from service.api.inference import operating_info
from service.api.limits import read_body_capped, require_json_object
from service.earlyexit.hull import TargetUnreachable
from service.earlyexit.modes import BUNDLE_MODE, get_mode
from service.serving.autopilot import AutopilotConfig
from service.serving.autopilot_runtime import AutopilotRuntime
from service.serving.engine import Engine
from service.serving.ic_serving import check_mode, profile_rows
from service.serving.snapshot import Snapshot
from service.serving.time_profiles import full_ms, profile_ms
from service.store.bundle_model import Bundle
from service.store.bundles import BundleError
from service.store.estimates import estimate_info, read_measured

router = APIRouter(tags=["data plane"])

SWITCH_ERRORS = {401: {"model": schemas.ErrorBody, "description": "unauthorized"},
                 404: {"model": schemas.ErrorBody, "description": "profile_not_found"},
                 409: {"model": schemas.ErrorBody,
                       "description": "mode_unavailable (no usable ICs for that mode); no_time_axis (a time target "
                                      "on a bundle never timed on this machine)"},
                 422: {"model": schemas.ErrorBody,
                       "description": "invalid_target, target_unreachable, floor_unreachable, slo_unreachable "
                                      "(a latency_slo_ms below what the cheapest allowed point achieves at batch 1; "
                                      "the message says what is reachable), unknown_mode, mode_mismatch"}}


def _share(snap: Snapshot, name: str) -> float:
    op = snap.operating
    if op.b is None:
        return 1.0 if name == op.a else 0.0
    return op.lam if name == op.a else (1.0 - op.lam if name == op.b else 0.0)


def _measured(engine: Engine, bundle_id: str) -> dict | None:
    try:
        return read_measured(engine.model_dir, bundle_id)
    except BundleError:  # a damaged measured.json hides the measurement, never the profiles
        return None


def _times(bundle: Bundle, name: str) -> dict:
    """A profile's measured time per sample (batch 1 and by batch size) and its fraction of the full network's."""
    ms = profile_ms(bundle, name)
    if ms is None:
        return {}
    by_batch = {b: v for b in (bundle.timing or {}).get("full_ms", {})
                if (v := profile_ms(bundle, name, b)) is not None}
    full = full_ms(bundle)
    return {"ms": ms, "ms_batch": by_batch, "time_fraction": ms / full if full else None}


def active_state(snap: Snapshot) -> schemas.ActiveState:
    return schemas.ActiveState(bundle=snap.bundle_id, profile=snap.profile_name, version=snap.version)


def switch_response(engine: Engine, new: Snapshot, old: Snapshot) -> schemas.SwitchResponse:
    return schemas.SwitchResponse(model=engine.spec.name, bundle=new.bundle_id, version=new.version,
                                  active=operating_info(new), previous=active_state(old))


def autopilot_info(runtime: AutopilotRuntime | None) -> schemas.AutopilotInfo:
    return schemas.AutopilotInfo.model_validate(runtime.info()) if runtime is not None else \
        schemas.AutopilotInfo(enabled=False)


@router.get("/profiles", response_model=schemas.ProfilesResponse)
async def list_profiles(state: StateDep, engine: EngineDep) -> schemas.ProfilesResponse:
    """Every profile that can serve now (the bundle's class-means profiles, then the IC profiles of each
    mode), with its mode, held-out accuracy and FLOPs fraction (IC costs included)."""
    snap = engine.snapshot
    b = snap.bundle
    measured = await anyio.to_thread.run_sync(_measured, engine, b.bundle_id)
    rows = [schemas.ProfileInfo(name=name, mode=mode, accuracy=p.accuracy, flops=p.flops,
                                flops_fraction=p.flops_fraction, thresholds=thr, exits=exits,
                                default=name == b.default_profile, active=name in (snap.operating.a, snap.operating.b),
                                share=_share(snap, name),
                                estimate=estimate_info(b, p, measured) if get_mode(mode).from_bundle else None,
                                **_times(b, name))
            for name, mode, thr, exits, p in profile_rows(b, snap.ic)]
    ic_info = engine.ic_store.info(snap.ic)
    return schemas.ProfilesResponse(model=engine.spec.name, bundle=b.bundle_id, version=snap.version,
                                    active=operating_info(snap), default_profile=b.default_profile,
                                    modes=ic_info["modes"], internal_classifiers=ic_info, profiles=rows,
                                    autopilot=autopilot_info(state.autopilot), members=_member_curves(b))


def _member_curves(bundle: Any) -> list[schemas.CascadeMemberCurve] | None:
    hulls = bundle.meta.get("member_hulls")
    if not isinstance(hulls, dict):
        return None
    return [schemas.CascadeMemberCurve(name=str(n), curve=[(float(f), float(a)) for f, a in pts])
            for n, pts in hulls.items()]


SWITCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": schemas.ProfileSwitch.model_json_schema()}}}}


@router.post("/profiles", response_model=schemas.SwitchResponse, responses=SWITCH_ERRORS,
             dependencies=[Depends(require_admin)], openapi_extra=SWITCH_BODY)
async def switch_profile(request: Request, state: StateDep, engine: EngineDep) -> schemas.SwitchResponse:
    """Switch by name, or by target (maybe a time-shared mix); persisted, atomic for in-flight requests.
    ``latency_slo_ms`` turns the latency autopilot on (persisted); any other switch turns it off."""
    raw = require_json_object(await read_body_capped(request, 64 * 1024, "body"))
    try:
        target = schemas.ProfileSwitch.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "invalid_target", f"{where}: {first.get('msg', 'invalid target')}") from None
    old = engine.snapshot
    if target.latency_slo_ms is not None:
        new = await _engage_autopilot(state.autopilot, target)
    elif target.name is not None:
        new = await anyio.to_thread.run_sync(engine.writer.switch_profile, target.name, target.mode)
    elif target.max_latency_ms is not None or target.max_time_fraction is not None:
        new = await anyio.to_thread.run_sync(
            lambda: engine.writer.switch_time(target.max_latency_ms, target.max_time_fraction))
    else:
        new = await anyio.to_thread.run_sync(
            lambda: engine.writer.switch_target(min_accuracy=target.min_accuracy,
                                                max_flops_fraction=target.max_flops_fraction, mode=target.mode))
    if state.autopilot is not None:
        state.autopilot.follow()  # on with the new configuration, or off after any other switch
    out = switch_response(engine, engine.snapshot if target.latency_slo_ms is not None else new, old)
    out.autopilot = autopilot_info(state.autopilot)
    return out


async def _engage_autopilot(runtime: AutopilotRuntime | None, target: schemas.ProfileSwitch) -> Snapshot:
    """Validate everything first (nothing changes on a 4xx), then persist the configuration."""
    check_mode(target.mode)  # 422 unknown_mode
    if runtime is None:
        raise ApiError(503, "not_ready", "the autopilot is not running")
    config = AutopilotConfig(float(target.latency_slo_ms or 0), target.min_accuracy, target.mode or BUNDLE_MODE)
    try:
        return await runtime.engage(config)  # 409 mode_unavailable; nothing changes on an error
    except TargetUnreachable as exc:
        raise ApiError(422, "floor_unreachable", f"min_accuracy {target.min_accuracy}: {exc}") from None
