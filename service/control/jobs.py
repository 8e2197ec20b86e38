"""Single-flight admin jobs: one at a time, run in a background thread, observable while they run.

A job is reserved first (so a second request gets :class:`JobInProgress` before it uploads anything), then
either failed early (bad upload) or started. Its state moves ``receiving -> running -> succeeded | failed``;
``progress`` says which phase it is in and how far. A job function returns a JSON-able result or raises;
an exception with a ``code`` attribute keeps that code, anything else is ``internal_error`` with no
internals in the message (the traceback goes to the log). Jobs themselves must leave no trace on failure:
that is the job function's contract, this module only records the outcome.

With a model directory, jobs live in the store (:mod:`service.control.job_store`): every process answers
for every job, one job runs at a time across all processes and replicas, and a job whose process died is
reported failed by the next process that starts (:meth:`JobManager.recover`).
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
from pathlib import Path
from typing import Any

from service.control.job_store import JobStore, process_info
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


PROGRESS_SAVE_S = 1.0


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
    process: dict[str, Any] = field(default_factory=process_info)
    sink: Callable[[Job, bool], None] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def set_progress(self, phase: str, done: int = 0, total: int = 0) -> None:
        self.progress = {"phase": phase, "done": int(done), "total": int(total)}
        if self.sink is not None:
            self.sink(self, False)

    def to_record(self) -> dict[str, Any]:
        """The stored form: the API's JSON plus the process that runs it and exact timestamps."""
        return {**self.to_json(), "process": self.process,
                "times": {"created": self.created, "started": self.started, "finished": self.finished}}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Job:
        times = rec.get("times") or {}
        job = cls(str(rec["id"]), str(rec.get("kind", "")), dict(rec.get("options") or {}),
                  state=str(rec.get("state", "failed")), created=float(times.get("created") or 0.0),
                  started=times.get("started"), finished=times.get("finished"),
                  progress=dict(rec.get("progress") or {}), result=rec.get("result"), error=rec.get("error"),
                  process=dict(rec.get("process") or {}))
        if not job.active:
            job.done.set()
        return job

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "options": self.options,
                "created": _iso(self.created), "started": _iso(self.started), "finished": _iso(self.finished),
                "progress": self.progress, "result": self.result, "error": self.error}


class JobManager:
    """Holds the recent jobs (the last ``keep``) and enforces one active job at a time."""

    def __init__(self, metrics: Metrics | None = None, keep: int = 50, model_dir: Path | None = None) -> None:
        self._metrics = metrics
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._active: Job | None = None
        self.store = JobStore(model_dir, keep) if model_dir is not None else None
        self._lock_fd: int | None = None
        self._saved_at = 0.0

    def reserve(self, kind: str, options: dict[str, Any] | None = None) -> Job:
        """Create a job in state ``receiving``; raises :class:`JobInProgress` while another is active
        (here, or in any process sharing the store)."""
        with self._lock:
            if self._active is not None and self._active.active:
                raise JobInProgress(self._active.id)
            if self.store is not None:
                self._lock_store_or_raise()
            job = Job(f"{kind.replace('_', '-')}-{secrets.token_hex(6)}", kind, dict(options or {}))
            job.set_progress("receiving")
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
            self._active = job
        if self.store is not None:
            job.sink = self._save
            self._save(job, True)
            self.store.prune()
        return job

    def _lock_store_or_raise(self) -> None:
        assert self.store is not None
        deadline = time.monotonic() + 0.5  # a process starting up may hold it for a moment (recover)
        while (fd := self.store.try_lock()) is None:
            if time.monotonic() >= deadline:
                other = self.store.running()
                raise JobInProgress(str(other["id"]) if other else "unknown")
            time.sleep(0.02)
        self._lock_fd = fd

    def _save(self, job: Job, force: bool) -> None:
        """Store the job's record: always on state changes, at most once a second for progress."""
        now = time.monotonic()
        if self.store is None or (not force and now - self._saved_at < PROGRESS_SAVE_S):
            return
        self._saved_at = now
        self.store.save(job.to_record())

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None and self.store is not None:
            rec = self.store.load(job_id)
            job = Job.from_record(rec) if rec is not None else None
        return job

    def list(self) -> list[Job]:
        if self.store is None:
            return list(self._jobs.values())
        stored = {r["id"]: Job.from_record(r) for r in self.store.records()}
        stored.update(self._jobs)
        return sorted(stored.values(), key=lambda j: j.created)[-self._keep:]

    def recover(self, cleanup: Callable[[dict[str, Any]], None] | None = None) -> list[str]:
        """Report jobs whose process died as failed (``job_abandoned``); ``cleanup(record)`` removes what such
        a job may have left in the store. Runs only when no live process holds the job lock; returns the ids."""
        if self.store is None:
            return []
        try:
            fd = self.store.try_lock()
        except Exception as exc:  # a read-only store: nothing can be recorded; serving goes on
            log.warning("cannot check for abandoned jobs: %s", exc)
            return []
        if fd is None:
            return []
        try:
            ids = []
            for rec in self.store.abandoned():
                who = rec.get("process") or {}
                job = Job.from_record(rec)
                if cleanup is not None:
                    cleanup(rec)
                job.state, job.finished = "failed", time.time()
                job.error = {"code": "job_abandoned", "message": f"the process running this job (pid "
                             f"{who.get('pid')} on {who.get('host')}) stopped before it finished; the store "
                             "is as it was before the job"}
                self.store.save(job.to_record())
                log.error("job %s was abandoned by a process that died; reported failed", job.id)
                ids.append(job.id)
            return ids
        finally:
            self.store.unlock(fd)

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
        self._save(job, True)
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
        """Record the outcome and free the slot in one step under the lock: whoever sees the job finished can
        reserve the next one at once (the slot is never still held by a job that reads as done)."""
        outcome = "failed" if error is not None else "succeeded"
        with self._lock:
            job.finished = time.time()
            job.result, job.error = result, error
            if error is None:
                job.progress = {"phase": "done", "done": 1, "total": 1}  # saved below, with the outcome
            job.state = outcome
            if self._active is job:
                self._active = None
                if self._lock_fd is not None and self.store is not None:
                    self.store.unlock(self._lock_fd)
                    self._lock_fd = None
        if self._metrics is not None:
            self._metrics.jobs.labels(job.kind, outcome).inc()
            self._metrics.job_duration.labels(job.kind).observe(job.finished - job.created)
        if self.store is not None:
            self._save(job, True)
        job.done.set()

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job finishes (or ``timeout``); returns it, or None if unknown."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.done.wait(timeout)
        return job
