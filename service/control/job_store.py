"""Admin job records and the one-job-at-a-time lock, kept in the model store so every process shares them.

``model_store/<model>/jobs/<id>.json`` holds one job's state (the same JSON ``GET /admin/jobs/{id}``
answers, plus which process runs it and exact timestamps), written atomically on every state change and at
most once a second on progress. ``model_store/<model>/locks/job.lock`` is held (``flock``) by the process
running a job for as long as it runs: a second job on any process of any replica is refused with
``job_in_progress``, and since the kernel drops the lock of a dead process, a record still ``receiving`` or
``running`` while nobody holds the lock belongs to a process that died (:meth:`JobStore.abandoned`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from service.store.atomic import write_json_atomic
from service.store.locks import is_read_only_error, lock_path, release, try_lock

log = logging.getLogger("classmeans.jobs")

JOBS_DIR = "jobs"
JOB_LOCK = "job.lock"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,99}$")
ACTIVE_STATES = ("receiving", "running")


def process_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


class JobStore:
    """Job records under ``<model_dir>/jobs`` and the store-wide job lock."""

    def __init__(self, model_dir: Path, keep: int = 50) -> None:
        self.model_dir = Path(model_dir)
        self.dir = self.model_dir / JOBS_DIR
        self.lock_file = lock_path(self.model_dir, JOB_LOCK)
        self.keep = keep

    def try_lock(self) -> int | None:
        """The job lock's descriptor (close it with :func:`release`), or None while another process holds it.
        Raises ``store_read_only`` when the store cannot be written."""
        return try_lock(self.lock_file)

    @staticmethod
    def unlock(fd: int) -> None:
        release(fd)

    def save(self, record: dict[str, Any]) -> None:
        """Write one record atomically; a read-only or failing store is logged, never raised (the job's
        state stays correct in the process that runs it)."""
        try:
            write_json_atomic(self.dir / f"{record['id']}.json", record)
        except OSError as exc:
            level = logging.WARNING if is_read_only_error(exc) else logging.ERROR
            log.log(level, "cannot store job %s: %s", record.get("id"), exc)

    def load(self, job_id: str) -> dict[str, Any] | None:
        if not JOB_ID_RE.match(job_id):
            return None
        try:
            obj = json.loads((self.dir / f"{job_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) and obj.get("id") == job_id else None

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("*.json"):
            rec = self.load(p.stem)
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: float((r.get("times") or {}).get("created") or 0.0))

    def running(self) -> dict[str, Any] | None:
        """The newest record still receiving or running (the one holding the lock, if any)."""
        active = [r for r in self.records() if r.get("state") in ACTIVE_STATES]
        return active[-1] if active else None

    def prune(self) -> None:
        """Keep the newest ``keep`` finished records."""
        done = [r for r in self.records() if r.get("state") not in ACTIVE_STATES]
        for rec in done[:max(0, len(done) - self.keep)]:
            with contextlib.suppress(OSError):
                (self.dir / f"{rec['id']}.json").unlink()

    def abandoned(self) -> list[dict[str, Any]]:
        """Records left ``receiving``/``running`` by a process that died. Only meaningful while the caller
        holds the job lock (then no live process is running a job)."""
        return [r for r in self.records() if r.get("state") in ACTIVE_STATES]
