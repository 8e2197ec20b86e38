"""A bounded LRU cache of compiled segment sessions, built lazily or ahead of time (``prepare``)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import onnxruntime as ort

from service.serving.compiled.segments import SegmentKey

log = logging.getLogger("classmeans.engine")


class SessionCache:
    """``SegmentKey -> InferenceSession``, at most ``capacity`` entries (least recently used evicted).

    ``build(key)`` makes a missing session (export + load + validate: tens to hundreds of milliseconds), under
    a lock so that two threads never build the same key; lookups of present keys take the lock only briefly.
    """

    def __init__(self, build: Callable[[SegmentKey], ort.InferenceSession], capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError("the session cache needs room for at least one session")
        self._build = build
        self.capacity = int(capacity)
        self._sessions: OrderedDict[SegmentKey, ort.InferenceSession] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self.builds = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: SegmentKey) -> bool:
        return key in self._sessions

    def __iter__(self) -> Iterator[SegmentKey]:
        return iter(self.keys())

    def keys(self) -> list[SegmentKey]:
        with self._lock:
            return list(self._sessions)

    def get(self, key: SegmentKey) -> ort.InferenceSession:
        with self._lock:
            s = self._sessions.get(key)
            if s is not None:
                self._sessions.move_to_end(key)
                return s
        with self._build_lock:
            with self._lock:
                s = self._sessions.get(key)
            if s is None:
                s = self._build(key)
                self.builds += 1
            with self._lock:
                self._sessions[key] = s
                self._sessions.move_to_end(key)
                while len(self._sessions) > self.capacity:
                    self._sessions.popitem(last=False)
                    self.evictions += 1
        return s

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


class _BuildCpu:
    """CPU seconds the background builders of this process have spent (all of them, thread CPU time), so
    that whoever measures the serving work's CPU from the process's total can leave the builds out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


BUILD_CPU = _BuildCpu()


def build_cpu_seconds() -> float:
    """CPU seconds spent by background session builds in this process so far."""
    return BUILD_CPU.seconds


def _lower_this_threads_priority() -> None:
    """Nice 10 for the calling thread only (Linux: a thread id is a valid PRIO_PROCESS target), so exports
    running beside traffic take the CPU that requests leave idle; elsewhere a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class BackgroundBuilder:
    """Builds sessions into a :class:`SessionCache` on one daemon thread, so that no request waits for an
    export: a runner asks for the keys it lacks and serves that batch on the reference engine meanwhile.

    A key whose build fails is remembered (``failed``: key -> reason) and never retried: its plans keep
    running on the reference engine, with the same answers.
    """

    def __init__(self, cache: SessionCache, name: str = "classmeans-session-builder") -> None:
        self.cache = cache
        self.name = name
        self.failed: dict[SegmentKey, str] = {}
        self._pending: set[SegmentKey] = set()
        self._queue: queue.Queue[SegmentKey | object] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._stopped = False
        _LIVE_BUILDERS.add(self)

    def request(self, keys: list[SegmentKey]) -> None:
        """Queue every key that is neither built, pending nor failed; returns at once (nothing once stopped)."""
        with self._lock:
            if self._stopped:
                return
            for k in keys:
                if k in self.cache or k in self._pending or k in self.failed:
                    continue
                self._pending.add(k)
                self._idle.clear()
                self._queue.put(k)
            if self._pending and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        _lower_this_threads_priority()
        while True:
            try:
                key = self._queue.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    if not self._pending:
                        self._thread = None
                        return
                continue
            if self._stopped or not isinstance(key, SegmentKey):  # stop(): what is still queued is dropped
                with self._lock:
                    self._thread = None
                return
            t0 = time.thread_time()
            try:
                self.cache.get(key)
            except Exception as exc:  # export/load/validation: remembered, the reference engine serves it
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                log.error("segment %s does not compile (%s); its profiles run on the reference engine",
                          key.label(), exc)
            finally:
                BUILD_CPU.add(time.thread_time() - t0)
                with self._lock:
                    self._pending.discard(key)
                    if not self._pending:
                        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (tests, start-up scripts); returns whether it got there."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float | None = None) -> bool:
        """Take no more keys, drop the queued ones and wait (at most ``timeout`` s) for the build under way.

        The thread is a daemon: left running at interpreter exit, it is killed inside torch's exporter or ONNX
        Runtime's session set-up, and the process aborts (``terminate called without an active exception``,
        exit status 134) instead of ending its graceful shutdown with 0. Returns whether the thread ended."""
        with self._lock:
            self._stopped = True
            self._pending.clear()
            self._idle.set()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        self._queue.put_nowait(_WAKE)  # the loop sees the flag now, not after its 5 s poll
        thread.join(timeout)
        return not thread.is_alive()


_WAKE = object()  # a queue item that only wakes the loop
_LIVE_BUILDERS: weakref.WeakSet[BackgroundBuilder] = weakref.WeakSet()


def stop_builders(timeout: float = 30.0, builders: Iterable[BackgroundBuilder] | None = None) -> int:
    """Stop ``builders`` (default: every background builder of this process, as at interpreter exit): each
    waits for its build under way, all together within ``timeout`` s. Returns how many were still building."""
    deadline = time.monotonic() + timeout
    left = 0
    for builder in list(_LIVE_BUILDERS if builders is None else builders):
        if not builder.stop(max(0.0, deadline - time.monotonic())):
            left += 1
    if left:
        log.warning("%d segment build(s) still running at shutdown", left)
    return left


atexit.register(stop_builders, 10.0)  # within a container stop's usual 10 s grace, with the drain before it
