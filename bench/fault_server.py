"""``classmeans serve`` with opt-in fault injection, for the reliability suite only.

    CLASSMEANS_FAULT_BLOCK_FILE=/tmp/x python -m bench.fault_server serve

It is the real server (``service.cli.main``) with a few functions wrapped before it starts; without any
``CLASSMEANS_FAULT_*`` variable it behaves exactly like ``classmeans serve``. Faults:

- ``CLASSMEANS_FAULT_BLOCK_FILE=path``: every inference batch waits while ``path`` exists (it writes
  ``path.entered`` first), so a test can hold the worker busy and fill the queue deterministically.
- ``CLASSMEANS_FAULT_CONTROL=path``: a file the test rewrites between jobs, read each time a point is
  reached. ``kill:<point>``: at ``point``, write ``path.reached`` and hang, so the test can SIGKILL the
  server exactly there. ``fail:<point>``: raise at ``point`` instead (a job failing part-way). Empty or
  absent: nothing happens.

Points, in the order a class-means job reaches them: ``calibrating`` (second calibration pass),
``staging_partial`` (``tensors.safetensors`` written into the staging dir, nothing else), ``staged`` (staging
complete, not yet renamed), ``published`` (bundle dir in place, not active), ``active_tmp`` (the new
``active.json`` written to its temporary sibling, not yet renamed), ``activated`` (``active.json`` replaced).
A write point fails with ``OSError(ENOSPC)`` (a full disk), ``calibrating`` with ``RuntimeError``.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

POINTS = ("calibrating", "staging_partial", "staged", "published", "active_tmp", "activated")
WRITE_POINTS = POINTS[1:]


def _hit(point: str) -> None:
    """Called when the code reaches ``point``: hang (kill point) or raise (fail point) when it is chosen."""
    control = Path(os.environ["CLASSMEANS_FAULT_CONTROL"])
    try:
        action, _, chosen = control.read_text().strip().partition(":")
    except OSError:
        return
    if chosen != point:
        return
    if action == "kill":
        Path(str(control) + ".reached").write_text(point)
        deadline = time.monotonic() + 600  # bounded: the test SIGKILLs us long before
        while time.monotonic() < deadline:
            time.sleep(0.5)
        os._exit(70)
    if action == "fail":
        if point == "calibrating":
            raise RuntimeError("injected fault in the middle of the calibration")
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


class _JsonHook:
    """``json`` for ``service.store.bundles``: the first ``dumps`` of a bundle write is the point
    ``staging_partial`` (the tensors file is already in the staging dir, bundle.json is not)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)

    def dumps(self, *args: Any, **kwargs: Any) -> str:
        if isinstance(args[0], dict) and "tensors_sha256" in args[0]:
            _hit("staging_partial")
        return json.dumps(*args, **kwargs)


class _OsHook:
    """``os`` for ``service.store.atomic``: ``replace`` onto ``active.json`` is wrapped by two points."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        is_active = Path(dst).name == "active.json"
        if is_active:
            _hit("active_tmp")
        os.replace(src, dst)
        if is_active:
            _hit("activated")


def install() -> None:
    """Wrap the functions named in the module docstring (only the ones the environment asks for)."""
    from service.control import jobs
    from service.serving.engine import Engine
    from service.store import atomic, bundles

    block = os.environ.get("CLASSMEANS_FAULT_BLOCK_FILE")
    if block:
        original_run = Engine.run_batch

        def run_batch(self: Engine, requests: list[Any]) -> list[Any]:
            path = Path(block)
            if path.exists():
                Path(block + ".entered").write_text(str(len(requests)))
                deadline = time.monotonic() + 300  # bounded: never hang a test run forever
                while path.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return original_run(self, requests)

        Engine.run_batch = run_batch  # type: ignore[method-assign]
    if not os.environ.get("CLASSMEANS_FAULT_CONTROL"):
        return
    original_progress = jobs.Job.set_progress

    def set_progress(self: jobs.Job, phase: str, done: int = 0, total: int = 0) -> None:
        if phase == "normalisers":
            _hit("calibrating")
        original_progress(self, phase, done, total)

    jobs.Job.set_progress = set_progress  # type: ignore[method-assign]
    bundles.json = _JsonHook()  # type: ignore[assignment]
    atomic.os = _OsHook()  # type: ignore[assignment]
    original_publish = bundles.publish_dir_atomic

    def publish_dir_atomic(staging: Path, final: Path) -> None:
        _hit("staged")
        original_publish(staging, final)
        _hit("published")

    bundles.publish_dir_atomic = publish_dir_atomic


def main(argv: list[str] | None = None) -> int:
    install()
    from service.cli.main import main as classmeans_main

    return classmeans_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
