"""The writers' locks of a model store: ``fcntl.flock`` on files under ``model_store/<model>/locks/``.

Every process that writes shared state (``active.json``, job records, new bundles from a job) serialises
through one of these locks, whether it is a worker of the same server, a second ``classmeans serve`` or a
CLI command. ``flock`` locks belong to an open file description: the kernel drops them when the holder dies,
so a crashed writer never leaves the store locked (no stale lock files to clean up). They work on local
disks and on NFSv4 / most network volumes that Kubernetes ReadWriteMany classes provide (Linux maps
``flock`` to NFS byte-range locks); a volume that supports no locking at all answers ``store_busy``.

Two failures have stable codes, both a :class:`StoreError` (a :class:`~service.errors.ServiceError`, apart from
the bundles' :class:`~service.store.bundles.BundleError`; the API turns them into the error envelope):

* ``store_busy`` (HTTP 503): another writer held the lock past the timeout; retry.
* ``store_read_only`` (HTTP 409): the store cannot be written (read-only volume or no permission); the
  process keeps serving what it has, but nothing can be switched from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from service.errors import RETRY_AFTER_S, ServiceError

LOCKS_DIR = "locks"
WRITER_LOCK = "active.lock"
POLL_S = 0.01
DEFAULT_TIMEOUT_S = 10.0
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class StoreError(ServiceError, ValueError):
    """The store's writers' lock or its volume refused a write (a ``ValueError`` too, as it was when these
    errors were bundle errors)."""

    code, status = "store_error", 503


class StoreBusy(StoreError):
    """Another writer held the store lock past the timeout (503; retry after a second)."""

    code, status = "store_busy", 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class StoreReadOnly(StoreError):
    """The store cannot be written by this process (409)."""

    code, status = "store_read_only", 409


def read_only_error(path: Path, exc: OSError) -> StoreReadOnly:
    return StoreReadOnly(f"the model store is read-only for this process ({path}: {exc.strerror}); it keeps "
                         "serving its current state, but switches must be made where the store is writable")


def is_read_only_error(exc: OSError) -> bool:
    return exc.errno in READ_ONLY_ERRNOS


def lock_path(model_dir: Path, name: str = WRITER_LOCK) -> Path:
    return Path(model_dir) / LOCKS_DIR / name


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if is_read_only_error(exc):
            raise read_only_error(path, exc) from exc
        raise


def try_lock(path: Path) -> int | None:
    """Take the lock at ``path`` without waiting: its file descriptor (close it to release), or None
    when another open file description holds it. Raises :class:`StoreReadOnly`."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
            raise StoreBusy(f"the store volume supports no file locks ({path}: {exc.strerror})") from exc
        raise
    return fd


def release(fd: int) -> None:
    """Release a lock taken with :func:`try_lock` (closing the descriptor drops the flock)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether some process holds the lock at ``path`` now (a probe: takes and drops it if free)."""
    if not path.exists():
        return False
    try:
        fd = try_lock(path)
    except StoreError:
        return False
    if fd is None:
        return True
    release(fd)
    return False


@contextlib.contextmanager
def store_lock(model_dir: Path, name: str = WRITER_LOCK, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive writer lock ``name`` of ``model_dir`` for the ``with`` block.

    Polls (non-blocking ``flock`` every 10 ms) up to ``timeout_s`` so a stuck writer turns into a clear
    ``store_busy`` instead of a hung request. Not re-entrant: take it once per operation.
    """
    path = lock_path(model_dir, name)
    deadline = time.monotonic() + timeout_s
    while True:
        fd = try_lock(path)
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            raise StoreBusy(f"another writer held the store lock {path} for more than {timeout_s:g} s; retry")
        time.sleep(POLL_S)
    try:
        yield
    finally:
        release(fd)
