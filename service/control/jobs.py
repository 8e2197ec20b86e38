"""Single-flight admin jobs: one at a time, run in a background thread, observable while they run.

A job is reserved first (so a second request gets :class:`JobInProgress` before it uploads anything), then
either failed early (bad upload) or started. Its state moves ``receiving -> running -> succeeded | failed``;
``progress`` says which phase it is in and how far. A job function returns a JSON-able result or raises;
an exception with a ``code`` attribute keeps that code, anything else is ``internal_error`` with no
internals in the message (the traceback goes to the log). Jobs themselves must leave no trace on failure:
that is the job function's contract, this module only records the outcome.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.errors import ServiceError
from service.serving.metrics import Metrics

log = logging.getLogger("classmeans.jobs")

ACTIVE_STATES = ("receiving", "running")


class JobInProgress(ServiceError):
    """Another job is receiving or running; ``job_id`` names it (409, with a ``Location`` to poll)."""

    code = "job_in_progress"
    status = 409

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is still running; one job at a time")
        self.job_id = job_id

    def headers(self) -> dict[str, str]:
        return {"Location": f"/admin/jobs/{self.job_id}"}

    def extra(self) -> dict[str, str]:
        return {"job_id": self.job_id}


class JobFailure(ServiceError):
    """An expected failure of a job, with a stable ``code`` and a message for the operator."""

    status = 422

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)


def release_memory() -> None:
    """Hand the memory a finished job freed back to the OS (a job holds a whole dataset and its features;
    glibc keeps freed heap pages otherwise, and the serving process's RSS would stay at its peak)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t is not None else None


@dataclass
class Job:
    id: str
    kind: str
    options: dict[str, Any]
    state: str = "receiving"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def set_progress(self, phase: str, done: int = 0, total: int = 0) -> None:
        self.progress = {"phase": phase, "done": int(done), "total": int(total)}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "options": self.options,
                "created": _iso(self.created), "started": _iso(self.started), "finished": _iso(self.finished),
                "progress": self.progress, "result": self.result, "error": self.error}


class JobManager:
    """Holds the recent jobs (the last ``keep``) and enforces one active job at a time."""

    def __init__(self, metrics: Metrics | None = None, keep: int = 50) -> None:
        self._metrics = metrics
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._active: Job | None = None

    def reserve(self, kind: str, options: dict[str, Any] | None = None) -> Job:
        """Create a job in state ``receiving``; raises :class:`JobInProgress` while another is active."""
        with self._lock:
            if self._active is not None and self._active.active:
                raise JobInProgress(self._active.id)
            job = Job(f"{kind.replace('_', '-')}-{secrets.token_hex(6)}", kind, dict(options or {}))
            job.set_progress("receiving")
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
            self._active = job
            return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    @property
    def active(self) -> Job | None:
        job = self._active
        return job if job is not None and job.active else None

    def fail(self, job: Job, code: str, message: str) -> None:
        """Finish a job as failed (e.g. its upload was refused before it started)."""
        self._finish(job, error={"code": code, "message": message})

    def start(self, job: Job, fn: Callable[[Job], dict[str, Any]]) -> None:
        """Run ``fn(job)`` in a background thread; its return value becomes ``job.result``."""
        job.state = "running"
        job.started = time.time()
        box = [fn]  # the thread must not keep fn (and the dataset it holds) alive after it ran
        threading.Thread(target=self._run, args=(job, box), name=f"classmeans-{job.id}", daemon=True).start()

    def _run(self, job: Job, box: list[Callable[[Job], dict[str, Any]]]) -> None:
        fn = box.pop()
        try:
            self._run_fn(job, fn)
        finally:
            del fn
            release_memory()

    def _run_fn(self, job: Job, fn: Callable[[Job], dict[str, Any]]) -> None:
        try:
            result = fn(job)
        except Exception as exc:
            code = getattr(exc, "code", None)
            if isinstance(code, str) and code:
                log.warning("job %s failed: %s: %s", job.id, code, exc)
                self._finish(job, error={"code": code, "message": str(exc)})
            elif isinstance(exc, ValueError):
                log.warning("job %s failed: %s", job.id, exc)
                self._finish(job, error={"code": "job_failed", "message": str(exc)})
            else:
                log.exception("job %s crashed", job.id)
                self._finish(job, error={"code": "internal_error",
                                         "message": "the job failed unexpectedly; see the server log"})
            return
        self._finish(job, result=result)

    def _finish(self, job: Job, result: dict[str, Any] | None = None,
                error: dict[str, str] | None = None) -> None:
        job.finished = time.time()
        job.result, job.error = result, error
        job.state = "failed" if error is not None else "succeeded"
        outcome = "failed" if error is not None else "succeeded"
        if error is None:
            job.set_progress("done", 1, 1)
        if self._metrics is not None:
            self._metrics.jobs.labels(job.kind, outcome).inc()
            self._metrics.job_duration.labels(job.kind).observe(job.finished - job.created)
        with self._lock:
            if self._active is job:
                self._active = None
        job.done.set()

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job finishes (or ``timeout``); returns it, or None if unknown."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.done.wait(timeout)
        return job
