"""The admin plane (bearer token on every route): class-means recompute jobs and bundle roll-back.

``POST /admin/class-means`` takes an ImageFolder ``.zip`` / ``.tar.gz`` as a raw body (``application/zip``,
``application/gzip``, ``application/x-tar``, ``application/octet-stream``) or as the ``file`` part of a
multipart form. The body is streamed to an anonymous temporary file under ``max_upload_bytes`` (413 the
moment the cap is passed), the archive is checked before any job runs (4xx with the archive's error code),
then a background job calibrates and, unless ``activate=false``, swaps the new bundle in. One job at a
time: 409 ``job_in_progress`` with the running job's ``Location``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from service.api import schemas
from service.api.auth import require_admin
from service.api.deps import EngineDep, StateDep
from service.api.errors import ApiError
from service.api.forms import parse_multipart
from service.api.limits import stream_to_tempfile
from service.api.routes.profiles import active_state, switch_response
from service.control.recompute import ClassMeansOptions, submit_recompute
from service.earlyexit.exit_head import METRICS
from service.earlyexit.search import SEARCH_MODES
from service.store.listing import bundle_summaries

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={401: {"model": schemas.ErrorBody, "description": "unauthorized"}})

ARCHIVE_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/gzip",
                           "application/x-gzip", "application/x-tar", "application/x-gtar",
                           "application/x-compressed-tar", "application/octet-stream"})
UPLOAD_ERRORS = {409: {"model": schemas.ErrorBody, "description": "job_in_progress (Location: the running job)"},
                 413: {"model": schemas.ErrorBody, "description": "payload_too_large, archive_bomb, too_many_files"},
                 415: {"model": schemas.ErrorBody, "description": "unsupported_media_type, unsupported_archive"},
                 422: {"model": schemas.ErrorBody, "description": "unsafe_archive_member, invalid_dataset_layout, "
                       "class_set_mismatch, invalid_dataset_image, duplicate_member, validation_error"}}
SearchMode = Literal[SEARCH_MODES]  # type: ignore[valid-type]
Metric = Literal[METRICS]  # type: ignore[valid-type]


def _job_or_404(state: StateDep, job_id: str) -> Any:
    job = state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (the store keeps the last 50 jobs)")
    return job


@router.post("/class-means", status_code=202, response_model=schemas.JobInfo, responses=UPLOAD_ERRORS)
async def upload_class_means(
    request: Request,
    state: StateDep,
    engine: EngineDep,
    holdout: Annotated[float, Query(gt=0, lt=1, description="fraction held out to choose thresholds")] = 0.1,
    search: Annotated[SearchMode, Query(description="threshold search mode")] = "quantile",
    samples: Annotated[int, Query(ge=10, le=200_000, description="threshold vectors to evaluate")] = 10_000,
    seed: Annotated[int, Query(ge=0)] = 0,
    activate: Annotated[bool, Query(description="activate the new bundle (false: only stage it)")] = True,
    reduction: Annotated[str | None, Query(pattern=r"^(full|gap|pool[1-9][0-9]?)$")] = None,
    metric: Annotated[Metric | None, Query()] = None,
    temperature: Annotated[float | None, Query(gt=0, le=1000)] = None,
    tag: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "upload",
    filename: Annotated[str | None, Query(max_length=200, description="the archive's name: for messages, and "
                                          "checked against the backbone's training data (model.json)")] = None,
    allow_overlap: Annotated[bool, Query(description="calibrate even when the archive is the backbone's training "
                                         "data (the bundle is labelled optimistic); default: the job fails with "
                                         "selection_overlaps_training")] = False,
) -> JSONResponse:
    """Upload an ImageFolder archive; a background job recomputes the class means (202 + job)."""
    opts = ClassMeansOptions(holdout=holdout, search=search, samples=samples, seed=seed, activate=activate,
                             reduction=reduction, metric=metric, temperature=temperature, tag=tag,
                             allow_overlap=allow_overlap)
    job = await submit_recompute(state.jobs, engine, opts,
                                 lambda: _archive(request, state.settings.max_upload_bytes, filename))
    return JSONResponse(schemas.JobInfo(**job.to_json()).model_dump(), status_code=202,
                        headers={"Location": f"/admin/jobs/{job.id}"})


@asynccontextmanager
async def _archive(request: Request, max_bytes: int, filename: str | None) -> AsyncIterator[tuple[Any, str | None]]:
    """The uploaded archive as a file (a multipart ``file`` part, or the raw body streamed to a temporary
    file under ``max_bytes``) and its name; closed on exit."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await parse_multipart(request, 1, ("file", "archive"))
        try:
            if not form.files:
                raise ApiError(422, "validation_error", "no 'file' part in the multipart body")
            yield form.files[0].file, filename or form.files[0].filename or None
        finally:
            await form.close()
    elif ctype in ARCHIVE_TYPES:
        fh = await stream_to_tempfile(request, max_bytes)
        try:
            yield fh, filename
        finally:
            fh.close()
    else:
        raise ApiError(415, "unsupported_media_type", "send the archive as application/zip, application/gzip "
                       "or application/x-tar, or as the 'file' part of multipart/form-data")


@router.post("/cascades", status_code=201, response_model=schemas.CascadeInfo,
             responses={404: {"model": schemas.ErrorBody, "description": "model_not_found (a member)"},
                        409: {"model": schemas.ErrorBody, "description": "model_exists"},
                        422: {"model": schemas.ErrorBody, "description": "cascade_class_mismatch, "
                              "cascade_input_mismatch, invalid_cascade, validation_error"}})
async def create_cascade(engine: EngineDep, body: schemas.CascadeCreate) -> JSONResponse:
    """Write a cascade of the store's models (``model_store/<name>/model.json``); calibrate it with
    ``classmeans calibrate`` or, once served (``--model <name>``), ``POST /admin/class-means``."""
    from service.store.cascade_dir import create_cascade as create

    store = engine.model_dir.parent
    spec = await anyio.to_thread.run_sync(lambda: create(store, body.name, body.members, replace=body.replace))
    info = schemas.CascadeInfo(model=spec.name, members=list(body.members), classes=list(spec.classes))
    return JSONResponse(info.model_dump(), status_code=201, headers={"Location": f"/v2/models/{spec.name}"})


@router.get("/jobs", response_model=schemas.JobList)
async def list_jobs(state: StateDep) -> schemas.JobList:
    """Recent jobs, oldest first."""
    return schemas.JobList(jobs=[schemas.JobInfo(**j.to_json()) for j in state.jobs.list()])


@router.get("/jobs/{job_id}", response_model=schemas.JobInfo,
            responses={404: {"model": schemas.ErrorBody, "description": "job_not_found"}})
async def get_job(state: StateDep, job_id: Annotated[str, Path(max_length=100)]) -> schemas.JobInfo:
    """A job's state, progress, and its result or the reason it failed."""
    return schemas.JobInfo(**_job_or_404(state, job_id).to_json())


@router.get("/bundles", response_model=schemas.BundlesResponse)
async def list_bundles(engine: EngineDep) -> schemas.BundlesResponse:
    """Every bundle in the store, the serving one marked."""
    rows = await anyio.to_thread.run_sync(bundle_summaries, engine.model_dir, engine.snapshot.bundle_id)
    return schemas.BundlesResponse(model=engine.spec.name, active=active_state(engine.snapshot),
                                   bundles=[schemas.BundleInfo(**r) for r in rows])


@router.post("/bundles/{bundle_id}/activate", response_model=schemas.SwitchResponse,
             responses={404: {"model": schemas.ErrorBody, "description": "bundle_not_found, profile_not_found"},
                        422: {"model": schemas.ErrorBody, "description": "invalid_bundle, bundle_model_mismatch"}})
async def activate_bundle(
    engine: EngineDep,
    bundle_id: Annotated[str, Path(max_length=100)],
    profile: Annotated[str | None, Query(max_length=200, description="default: the bundle's default")] = None,
) -> schemas.SwitchResponse:
    """Validate a bundle fully and serve it (roll back or forward); persisted."""
    old = engine.snapshot
    new = await anyio.to_thread.run_sync(lambda: engine.writer.activate_bundle(bundle_id, profile))
    return switch_response(engine, new, old)

