"""Crash-safe file writes: temporary sibling, fsync, ``os.replace``, fsync of the directory.

A crash at any moment leaves either the old file or the new one, never a half-written file. Temporary
siblings carry the ``.tmp`` suffix so start-up can sweep the leftovers of a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; published files get the usual umask-governed mode unless told otherwise.
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any, mode: int | None = None) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), mode=mode)


def fresh_staging_dir(final: Path) -> Path:
    """An empty staging directory ``.<name>.tmp`` beside ``final`` (a leftover one is removed first), to be
    filled and then published with :func:`publish_dir_atomic`."""
    staging = final.parent / f".{final.name}{TMP_SUFFIX}"
    final.parent.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def publish_dir_atomic(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory to ``final`` (which must not exist) in one rename."""
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(staging)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    os.replace(staging, final)
    fsync_dir(final.parent)


def sweep_tmp(root: Path) -> list[Path]:
    """Remove ``*.tmp`` leftovers of interrupted writes below ``root``; returns what was removed."""
    removed = []
    if not root.exists():
        return removed
    for p in sorted(root.rglob(f"*{TMP_SUFFIX}"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
