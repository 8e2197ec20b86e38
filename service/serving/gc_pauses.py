"""Keep the cyclic garbage collector's pauses off the request path, and measure the ones that remain.

**Why.** A serving process holds a large heap that never dies: torch and ONNX Runtime modules, the bundles,
FastAPI's routes and pydantic models (about 250,000 tracked objects on the default cascade). CPython's
full collection (generation 2) walks every tracked object, and it runs whenever the objects that survived
younger collections since the last full one reach a quarter of the long-lived ones: in a loaded server,
every 20-30 s. Each took 100-160 ms on one core (measured with ``gc.callbacks``: the default cascade pinned
to one core at 313 requests/s), holding the GIL, so every request in flight waited that long: with a 50 ms
latency target, that alone is a p99 miss, and admission refused the requests that arrived meanwhile.

**What.** :func:`freeze_startup_heap`, called once the model is loaded and warmed up, collects what
start-up left behind and moves every surviving object to the permanent generation (``gc.freeze()``, the
approach of Python's documentation for pre-fork servers), so that full collections walk only what was
made since: the request path's short-lived cycles. Objects of bundles loaded later are ordinary objects
again (a later switch may free them), never frozen.

:class:`GcPauses` records every collection's wall time per generation (``gc.callbacks``), exported as the
``classmeans_gc_pause_seconds`` histogram (once a second, never from inside a collection), so that a pause is
seen, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Frozen:
    """What :func:`freeze_startup_heap` did: objects collected first, objects frozen, seconds it took."""

    collected: int
    frozen: int
    seconds: float


def freeze_startup_heap() -> Frozen:
    """``gc.collect()`` then ``gc.freeze()``: the start-up heap leaves every later collection's walk."""
    t0 = time.perf_counter()
    collected = gc.collect()
    gc.freeze()
    return Frozen(collected, gc.get_freeze_count(), time.perf_counter() - t0)


class GcPauses:
    """Wall time of each collection, by generation, through ``gc.callbacks`` (install / uninstall).

    The callback runs wherever a collection starts: in any thread, in the middle of any code that allocates,
    including code that holds a lock (prometheus_client's, for one). So it takes no lock and calls nothing:
    it counts (``count``, ``total_s``, ``max_s`` per generation) and appends ``(generation, seconds)`` to a
    bounded queue. :meth:`drain` hands what is queued to ``observe`` (in the app: the
    ``classmeans_gc_pause_seconds`` histogram) from a safe place, :meth:`export_every` on the event loop.
    (Observing from the callback deadlocked a worker of a two-worker container: a collection started inside
    a metric update, and the callback waited for the lock that update held.)
    """

    def __init__(self, observe: Callable[[int, float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, max_pending: int = 4096) -> None:
        self._observe = observe
        self._clock = clock
        self._started: dict[int, float] = {}  # thread id -> start of its collection in progress
        self.pending: deque[tuple[int, float]] = deque(maxlen=max_pending)
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._installed = False

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        tid = threading.get_ident()
        if phase == "start":
            self._started[tid] = self._clock()
            return
        t0 = self._started.pop(tid, None)
        if t0 is None:
            return
        gen = min(2, max(0, int(info.get("generation", 0))))
        seconds = max(0.0, self._clock() - t0)
        self.count[gen] += 1
        self.total_s[gen] += seconds
        self.max_s[gen] = max(self.max_s[gen], seconds)
        self.pending.append((gen, seconds))

    def drain(self) -> int:
        """Hand every queued pause to ``observe`` (never from a collection); returns how many."""
        n = 0
        while True:
            try:
                gen, seconds = self.pending.popleft()
            except IndexError:
                return n
            n += 1
            if self._observe is not None:
                self._observe(gen, seconds)

    async def export_every(self, interval_s: float = 1.0) -> None:
        """Drain every ``interval_s`` until cancelled (the app's lifespan runs it)."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                self.drain()
        finally:
            self.drain()

    def install(self) -> GcPauses:
        if not self._installed:
            gc.callbacks.append(self)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self)
            self._installed = False
