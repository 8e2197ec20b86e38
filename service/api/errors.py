"""One error envelope for every failure: ``{"error": {"code": "...", "message": "..."}}``.

Every domain exception derives from :class:`service.errors.ServiceError` and carries its stable ``code``,
its status, and any headers (``Retry-After``, ``Location``); one handler maps them all. The framework's
own errors (routing, validation) get the same envelope; :class:`ApiError` (HTTP-only checks in the routes)
is a ``ServiceError`` too. Messages are for humans and never carry a traceback or an exception class name. Bad input is
always a 4xx; an unexpected exception is a 500 ``internal_error`` whose details go to the log only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import RETRY_AFTER_S as _RETRY_AFTER
from service.errors import ServiceError

log = logging.getLogger("classmeans.api")

RETRY_AFTER_S = str(_RETRY_AFTER)

# Status of a plain HTTPException (raised by the framework) -> its code.
CODE_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                  415: "unsupported_media_type", 422: "validation_error", 503: "unavailable"}



class ApiError(ServiceError):
    """An HTTP-only refusal (a size cap, a media type, a malformed form or body) with a stable ``code``, its
    status and headers: a :class:`ServiceError` like every other expected failure, so whatever records a
    failure (a job, the log) reads its code the same way."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code)
        self.status = status
        self._headers = headers

    def headers(self) -> dict[str, str] | None:
        return self._headers


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


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    """Every domain exception: its own code, status hint, headers and extra envelope fields."""
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.headers(), **exc.extra())


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the server log")


def _handlers() -> dict[type[Exception], Any]:
    return {StarletteHTTPException: _http_error, RequestValidationError: _validation_error,
            ServiceError: _service_error, Exception: _internal_error}


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
