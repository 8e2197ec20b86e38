"""Liveness, readiness (OIP v2 paths and ``/livez`` ``/readyz`` aliases), the index and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import __version__
from service.api import schemas
from service.api.deps import StateDep
from service.api.errors import RETRY_AFTER_S, envelope

router = APIRouter(tags=["health"])

NOT_READY = {503: {"model": schemas.ErrorBody, "description": "not_ready (Retry-After)"}}


def _ready_response(state: StateDep) -> JSONResponse:
    if state.ready:
        return JSONResponse({"ready": True})
    body = {"ready": False, **envelope("not_ready", state.not_ready_reason or "not ready")}
    return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


@router.get("/v2/health/live", response_model=schemas.Live)
async def live() -> schemas.Live:
    """The process is up (it may still be loading)."""
    return schemas.Live()


@router.get("/livez", response_model=schemas.Live)
async def livez() -> schemas.Live:
    """Alias of ``/v2/health/live``."""
    return schemas.Live()


@router.get("/v2/health/ready", response_model=schemas.Ready, responses=NOT_READY)
async def ready(state: StateDep) -> JSONResponse:
    """200 once the model, the active bundle and profile are loaded and warmed up; 503 otherwise."""
    return _ready_response(state)


@router.get("/readyz", response_model=schemas.Ready, responses=NOT_READY)
async def readyz(state: StateDep) -> JSONResponse:
    """Alias of ``/v2/health/ready``."""
    return _ready_response(state)


@router.get("/", response_model=schemas.Index)
async def index(state: StateDep) -> schemas.Index:
    """What this server is and where to go."""
    return schemas.Index(
        service="classmeans-serve", version=__version__, model=state.settings.model, ready=state.ready,
        reason=None if state.ready else state.not_ready_reason,
        endpoints={"classify": "POST /classify", "profiles": "GET|POST /profiles", "ready": "GET /readyz",
                   "live": "GET /livez", "v2": "GET /v2/models/{name}, POST /v2/models/{name}/infer",
                   "metrics": "GET /metrics", "admin": "/admin/* (bearer token)", "docs": "GET /docs"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition of this process's metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
