"""The compiled engine's failures, in the project's one error hierarchy (:mod:`service.errors`).

* :class:`EngineBuildError` -- a segment could not be exported to ONNX, loaded by ONNX Runtime, or gave other
  answers than the torch modules it came from (``engine_build_failed``: a start-up or activation
  failure, never raised for a request unless sessions are built lazily on the hot path). It names the
  segment and, when one can be singled out, the stage that failed. 409 when a bundle activation asks for it:
  the bundle cannot be served by the engine this process was started with.
* :class:`EngineFailed` -- an ONNX Runtime call raised while serving (``engine_failed``, 503: the process
  stays ready, the client may retry). Raised only when the runner is configured not to re-run the batch on
  the reference engine.
"""

from __future__ import annotations

from service.errors import ServiceError


class EngineBuildError(ServiceError):
    """A segment of the network could not be compiled; ``segment`` and ``stage`` say which (or None)."""

    code, status = "engine_build_failed", 409

    def __init__(self, message: str, segment: str | None = None, stage: str | None = None) -> None:
        super().__init__(message)
        self.segment = segment
        self.stage = stage


class EngineFailed(ServiceError):
    """The compiled engine failed at run time; no answer was returned for the batch."""

    code, status = "engine_failed", 503
