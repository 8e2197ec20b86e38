"""Every serving process follows ``active.json``: a background thread polls it and adopts newer versions.

The model store is the one source of truth. A switch made by any process (another worker of the same
server, another replica on a shared volume, the CLI) is written to ``active.json`` under the store lock
with a bumped version; every process sees the change within one poll interval and swaps its snapshot with
:meth:`StateWriter.adopt <service.serving.state_writer.StateWriter.adopt>` (the same atomic swap an admin
switch uses; in-flight requests finish on the snapshot they were admitted with). It is the one reader of
``active.json`` in a serving process: the autopilot's configuration comes with the adopted snapshot.

Polling, not only inotify: inotify does not see writes made on another machine of a network volume. Each
poll is one ``stat`` (inode, size, mtime: ``os.replace`` always gives a new inode); the file is read only when
that changes, and also every ``reread_s`` regardless, for volumes whose attribute caches hide a change for a
while. A torn or malformed file (written by hand, or by a tool that does not write atomically) is logged
as an error once and ignored: the last good state keeps serving until a valid, newer version appears.
Versions only grow: a file whose version is not above the one serving is never adopted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from service.errors import ServiceError
from service.store.bundles import ACTIVE_FILE, BundleError, read_active

log = logging.getLogger("classmeans.follower")

DEFAULT_INTERVAL_S = 0.2
DEFAULT_REREAD_S = 2.0


class Adopter(Protocol):
    """What adopts a newer state: :class:`~service.serving.state_writer.StateWriter` in production."""

    def adopt(self, active: dict[str, Any]) -> bool: ...


class Followed(Protocol):
    """What the follower follows: :class:`~service.serving.engine.Engine` in production."""

    model_dir: Path
    writer: Adopter


Signature = tuple[int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ActiveFollower:
    """Poll ``<model_dir>/active.json`` every ``interval_s`` in a daemon thread and adopt newer versions."""

    def __init__(self, engine: Followed, interval_s: float = DEFAULT_INTERVAL_S,
                 reread_s: float = DEFAULT_REREAD_S) -> None:
        self.engine = engine
        self.path = Path(engine.model_dir) / ACTIVE_FILE
        self.interval_s = interval_s
        self.reread_s = reread_s
        self.adopted = 0
        self.errors = 0
        self._seen: Signature | None = None  # the first poll reads: a switch may have landed since the load
        self._last_read = time.monotonic()
        self._bad: tuple[Signature | None, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="classmeans-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # never let the thread die: the next poll tries again
                log.exception("following %s failed", self.path)

    def poll(self) -> bool:
        """One check; returns whether a newer state was adopted."""
        sig = _signature(self.path)
        now = time.monotonic()
        if sig == self._seen and sig is not None and now - self._last_read < self.reread_s:
            return False
        self._seen, self._last_read = sig, now
        if sig is None:
            return False  # no file (yet): keep serving what we have
        try:
            active = read_active(self.path.parent)
        except BundleError as exc:
            self._report(sig, f"ignoring a malformed {ACTIVE_FILE} ({exc}); the last good state keeps serving")
            return False
        if active is None:
            return False
        try:
            changed = self.engine.writer.adopt(active)
        except (ServiceError, KeyError, TypeError, ValueError) as exc:
            self._report(sig, f"cannot adopt {ACTIVE_FILE} version {active.get('version')!r} (bundle "
                              f"{active.get('bundle')!r}): {exc}; the last good state keeps serving")
            return False
        self._bad = None
        if changed:
            self.adopted += 1
        return changed

    def _report(self, sig: Signature | None, message: str) -> None:
        """Log each distinct problem once (the file is re-read every few seconds while it stays bad)."""
        self.errors += 1
        if self._bad != (sig, message):
            log.error("%s", message)
            self._bad = (sig, message)


def start_follower(engine: Followed, interval_s: float = DEFAULT_INTERVAL_S) -> ActiveFollower:
    """Start following ``engine``'s store (``interval_s`` <= 0: do not follow)."""
    follower = ActiveFollower(engine, interval_s)
    if interval_s > 0:
        follower.start()
    return follower
