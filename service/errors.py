"""The one error root: every failure the service expects derives from :class:`ServiceError`.

A ``ServiceError`` carries a stable machine-readable ``code``, the HTTP ``status`` it maps to (a hint:
nothing below ``service.api`` knows about HTTP, the API turns it into the envelope
``{"error": {"code": ..., "message": ...}}`` in one place, ``service/api/errors.py``), a human message
without internals, and optionally response ``headers`` (``Retry-After``, ``Location``) and ``extra``
envelope fields. Subclasses fix a default code and status; a code-specific status comes from
``STATUS_BY_CODE`` on the subclass.

This module is a leaf: it imports nothing from the project, so every layer (even the pure math in
``service.earlyexit``) may derive its exceptions from it.
"""

from __future__ import annotations

from typing import Any, ClassVar

RETRY_AFTER_S = 1  # seconds a client should wait before retrying a 503


class ServiceError(Exception):
    """An expected failure with a stable ``code`` and an HTTP ``status`` hint."""

    code: str = "service_error"
    status: int = 500
    STATUS_BY_CODE: ClassVar[dict[str, int]] = {}
    default_message: ClassVar[str] = ""

    def __init__(self, message: str | None = None, code: str | None = None) -> None:
        super().__init__(message if message is not None else self.default_message)
        if code:
            self.code = code
        self.status = self.STATUS_BY_CODE.get(self.code, type(self).status)

    @property
    def message(self) -> str:
        return str(self)

    def headers(self) -> dict[str, str] | None:
        """Response headers the answer should carry (none by default)."""
        return None

    def extra(self) -> dict[str, Any]:
        """Extra fields of the error envelope (none by default)."""
        return {}


class ProfileNotFound(ServiceError):
    """A profile name that the serving bundle (and its IC set) does not have (404)."""

    code, status = "profile_not_found", 404


class ActiveStateError(ServiceError):
    """``active.json``'s operating point is malformed (422 ``invalid_active``)."""

    code, status = "invalid_active", 422


class ModeError(ServiceError):
    """A decision mode that does not exist (422 ``unknown_mode``), is not the profile's (422
    ``mode_mismatch``), or cannot be served now (409 ``mode_unavailable``): the subclasses."""

    code, status = "unknown_mode", 422


class UnknownMode(ModeError):
    pass


class ModeMismatch(ModeError):
    code = "mode_mismatch"


class ModeUnavailable(ModeError):
    code, status = "mode_unavailable", 409
