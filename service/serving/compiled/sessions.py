"""A bounded LRU cache of compiled segment sessions, built lazily or ahead of time (``prepare``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import onnxruntime as ort

from service.serving.compiled.segments import SegmentKey


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
