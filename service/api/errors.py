"""One error envelope for every failure: ``{"error": {"code": "...", "message": "..."}}``.

Codes are stable and documented per route; messages are for humans and never carry a traceback or an
exception class name. Bad input is always a 4xx; an unexpected exception is a 500 ``internal_error``
whose details go to the log only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.control.jobs import JobInProgress
from service.earlyexit.hull import TargetUnreachable
from service.ingest.images import ImageError
from service.ingest.labelled import DatasetError
from service.serving.batcher import BatcherClosed, DeadlineExceeded, Overloaded, QueueTimeout
from service.store.bundles import BundleError

log = logging.getLogger("classmeans.api")

RETRY_AFTER_S = "1"

# Status of a plain HTTPException (raised by the framework) -> its code.
CODE_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                  415: "unsupported_media_type", 422: "validation_error", 503: "unavailable"}

DATASET_STATUS = {"unsupported_archive": 415, "archive_bomb": 413, "too_many_files": 413}
BUNDLE_STATUS = {"bundle_not_found": 404, "profile_not_found": 404, "mode_unavailable": 409,
                 "active_conflict": 409, "store_read_only": 409, "store_busy": 503}


class ApiError(StarletteHTTPException):
    """An HTTP error with a stable ``code`` (an HTTPException, so FastAPI re-raises it unchanged)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message


def not_ready(reason: str) -> ApiError:
    return ApiError(503, "not_ready", reason, {"Retry-After": RETRY_AFTER_S})


def payload_too_large(limit: int, what: str = "request body") -> ApiError:
    return ApiError(413, "payload_too_large", f"the {what} is larger than the limit of {limit} bytes")


def envelope(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(envelope(code, message, **extra), status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)
    code = CODE_BY_STATUS.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, exc.headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    details = [{"loc": _loc(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in errors[:10]]
    message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details) or "invalid request"
    return error_response(422, "validation_error", message, details=details)


async def _image_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    return error_response(exc.status, exc.code, str(exc))


async def _dataset_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DatasetError)
    return error_response(DATASET_STATUS.get(exc.code, 422), exc.code, str(exc))


async def _bundle_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BundleError)
    retry = {"Retry-After": RETRY_AFTER_S} if exc.code == "store_busy" else None
    return error_response(BUNDLE_STATUS.get(exc.code, 422), exc.code, str(exc), headers=retry)


async def _target_unreachable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "target_unreachable", str(exc))


async def _job_in_progress(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobInProgress)
    return error_response(409, "job_in_progress", f"job {exc.job_id} is still running; one job at a time",
                          headers={"Location": f"/admin/jobs/{exc.job_id}"}, job_id=exc.job_id)


async def _batcher_error(request: Request, exc: Exception) -> JSONResponse:
    retry = {"Retry-After": RETRY_AFTER_S}
    if isinstance(exc, Overloaded):
        return error_response(503, "overloaded", "the server is at capacity; retry shortly",
                              headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, QueueTimeout):
        return error_response(503, "queue_timeout", "the request waited in the queue past its deadline",
                              headers=retry)
    if isinstance(exc, DeadlineExceeded):
        return error_response(504, "deadline_exceeded", "the request did not finish before its deadline")
    if isinstance(exc, BatcherClosed):
        return error_response(503, "not_ready", "the server is shutting down", headers=retry)
    return await _internal_error(request, exc)  # pragma: no cover - every subclass is listed above


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the server log")


def _handlers() -> dict[type[Exception], Any]:
    from service.serving.batcher import BatcherError

    return {StarletteHTTPException: _http_error, RequestValidationError: _validation_error,
            ImageError: _image_error, DatasetError: _dataset_error, BundleError: _bundle_error,
            TargetUnreachable: _target_unreachable, JobInProgress: _job_in_progress,
            BatcherError: _batcher_error, Exception: _internal_error}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type the app can raise to the envelope."""
    for exc_type, handler in _handlers().items():
        app.add_exception_handler(exc_type, handler)


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """The envelope response for ``exc``, chosen as the app's handlers are (nearest class in the MRO);
    for code that answers outside FastAPI's exception middleware (the lean /classify lane)."""
    handlers = _handlers()
    for cls in type(exc).__mro__:
        if cls in handlers:
            return await handlers[cls](request, exc)
    return await _internal_error(request, exc)  # pragma: no cover - Exception is always in the MRO
