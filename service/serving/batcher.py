"""Dynamic batching: gather concurrent requests, run them together in one worker thread.

Requests wait in a bounded queue (counted in samples). A collector task on the event loop takes the oldest
request, waits up to ``max_delay_s`` for more (or until ``max_batch_size`` samples are there), and hands the
batch to a single worker thread, so the event loop never runs torch. While a batch runs, new requests
queue up and form the next batch. Admission is immediate: when the queue is full ``submit`` raises
:class:`Overloaded` at once (a fast 503), it never waits for room.

Every request has a deadline. One whose deadline passes while it is still queued is dropped before it
reaches the network (:class:`QueueTimeout`); one whose deadline passes while its batch runs gets
:class:`DeadlineExceeded` (its result is thrown away when the batch ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service.errors import RETRY_AFTER_S, ServiceError

log = logging.getLogger("classmeans.batcher")

RunFn = Callable[[list[Any]], Sequence[Any]]


class BatcherError(ServiceError):
    """Base of the errors a submitted request can end with (besides the run function's own)."""

    status = 503
    retry_after: int | None = RETRY_AFTER_S

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class Overloaded(BatcherError):
    """The queue is full: a fast 503; retry after ``retry_after`` seconds."""

    code = "overloaded"
    default_message = "the server is at capacity; retry shortly"

    def __init__(self, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__()
        self.retry_after = retry_after


class QueueTimeout(BatcherError):
    """The deadline passed before the request reached the network (it was never run)."""

    code = "queue_timeout"
    default_message = "the request waited in the queue past its deadline"


class DeadlineExceeded(BatcherError):
    """The deadline passed while the request's batch was running."""

    code = "deadline_exceeded"
    status = 504
    retry_after = None
    default_message = "the request did not finish before its deadline"


class BatcherClosed(BatcherError):
    """The batcher is stopping (shutdown) and takes no new work."""

    code = "not_ready"
    default_message = "the server is shutting down"


@dataclass(eq=False)
class _Pending:
    payload: Any
    size: int
    deadline: float
    enqueued: float
    future: asyncio.Future[Any]
    started: float | None = None
    dropped: bool = False
    batch_samples: int = 0


@dataclass
class Submitted:
    """What ``submit`` returns: the run function's result for this request and where its time went."""

    result: Any
    queue_seconds: float
    batch_samples: int


@dataclass
class BatcherStats:
    batches: int = 0
    samples: int = 0
    busy_s: float = 0.0  # seconds the worker spent running batches (the measured service time)
    busy_samples: int = 0  # samples of the batches counted in busy_s (finished batches only)
    history: deque[int] = field(default_factory=lambda: deque(maxlen=64))


class Batcher:
    """Bounded-queue dynamic batcher over a synchronous ``run(payloads) -> results`` function.

    ``run`` gets the payloads of one batch (in arrival order) and returns one result per payload; a
    result that is an ``Exception`` instance is raised to that request only. If ``run`` itself raises,
    every request of the batch gets the exception.
    """

    def __init__(self, run: RunFn, *, max_batch_size: int, max_delay_s: float, queue_size: int,
                 thread_name: str = "classmeans-infer", thread_init: Callable[[], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_wait: Callable[[float], None] | None = None,
                 on_reject: Callable[[str], None] | None = None) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_delay_s >= 0")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self._thread_name = thread_name
        self._thread_init = thread_init
        self._on_depth = on_depth or (lambda n: None)
        self._on_wait = on_wait or (lambda s: None)
        self._on_reject = on_reject or (lambda reason: None)  # each refusal, by reason (the metrics count them)
        self._queue: deque[_Pending] = deque()
        self._queued = 0  # samples waiting (dropped requests excluded)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch_requests = 0
        self.running_samples = 0  # samples of the batch in the network now (0: idle)
        self.running_since: float | None = None  # when it started (monotonic)
        self.stats = BatcherStats()

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker thread and the collector task (on the running loop)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name,
                                            initializer=self._thread_init)
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._collect(), name=f"{self._thread_name}-collector")

    async def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued and running, then stop the worker thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning("batcher did not drain within %.1f s; dropping the rest", timeout or 0)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the server is shutting down"))
        self._queue.clear()
        self._set_queued(0)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued_samples(self) -> int:
        return self._queued

    def running_left_s(self, per_sample_s: float, now: float | None = None) -> float:
        """Expected seconds the batch in the network still needs, at ``per_sample_s`` (0 when idle)."""
        if self.running_since is None:
            return 0.0
        elapsed = (time.monotonic() if now is None else now) - self.running_since
        return max(0.0, self.running_samples * per_sample_s - elapsed)

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more samples would be admitted right now (a cheap pre-check before decoding)."""
        return not self._closing and self._queued + size <= self.queue_size

    def admit(self, size: int) -> None:
        """The pre-check as a refusal: :class:`BatcherClosed` while stopping, a fast :class:`Overloaded`
        (counted, reason ``overloaded``) when ``size`` more samples would not fit now."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if not self.has_room(size):
            self._on_reject("overloaded")
            raise Overloaded()

    # -- submitting ------------------------------------------------------------------------------------

    async def submit(self, payload: Any, size: int, deadline: float) -> Submitted:
        """Queue ``payload`` (``size`` samples) and wait for its result until ``deadline`` (monotonic).

        Raises :class:`Overloaded` at once when the queue has no room, :class:`QueueTimeout` or
        :class:`DeadlineExceeded` when the deadline passes (each counted through ``on_reject``: ``overloaded``,
        ``queue_timeout``, ``deadline``), :class:`BatcherClosed` while stopping.
        """
        if self._closing or self._task is None:
            raise BatcherClosed("the server is shutting down")
        if self._queued + size > self.queue_size:
            self._on_reject("overloaded")
            raise Overloaded()
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        p = _Pending(payload, size, deadline, now, loop.create_future())
        self._queue.append(p)
        self._set_queued(self._queued + size)
        assert self._wakeup is not None
        self._wakeup.set()
        # One timer instead of wait_for(shield(...)) (two extra futures and a task per request): at the
        # deadline it fails the request's own future, which the collector then skips.
        timer = loop.call_later(max(0.0, deadline - now), self._expire, p)
        try:
            result = await p.future
        except asyncio.CancelledError:  # the client went away
            if p.started is None:
                self._drop(p)
            raise
        except QueueTimeout:
            self._on_reject("queue_timeout")
            raise
        except DeadlineExceeded:
            self._on_reject("deadline")
            raise
        finally:
            timer.cancel()
        assert p.started is not None
        return Submitted(result, p.started - p.enqueued, p.batch_samples)

    def _expire(self, p: _Pending) -> None:
        """The deadline of ``p`` passed: still queued -> :class:`QueueTimeout` (it never runs), running ->
        :class:`DeadlineExceeded` (its result is thrown away when the batch ends)."""
        if p.future.done():
            return
        if p.started is None:
            self._drop(p)
            p.future.set_exception(QueueTimeout("the request waited in the queue past its deadline"))
        else:
            p.future.set_exception(DeadlineExceeded("the request did not finish before its deadline"))

    def _drop(self, p: _Pending) -> None:
        if not p.dropped:
            p.dropped = True
            self._set_queued(self._queued - p.size)

    def _set_queued(self, n: int) -> None:
        self._queued = n
        self._on_depth(n)

    # -- collecting and running ------------------------------------------------------------------------

    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            self._discard_dead_head()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            samples = sum(p.size for p in batch)
            self._last_batch_requests = len(batch)
            self.stats.batches += 1
            self.stats.samples += samples
            self.stats.history.append(samples)
            self.running_samples, self.running_since = samples, time.monotonic()
            try:
                try:
                    results = await loop.run_in_executor(self._executor, self._run, [p.payload for p in batch])
                finally:
                    self.stats.busy_s += time.monotonic() - self.running_since
                    self.stats.busy_samples += samples
                    self.running_samples, self.running_since = 0, None
                if len(results) != len(batch):
                    raise RuntimeError(f"run returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # the run function failed as a whole: every request hears it
                log.exception("batch of %d requests failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, r in zip(batch, results, strict=True):
                p.batch_samples = samples
                if p.future.done():
                    continue
                if isinstance(r, Exception):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)

    def _discard_dead_head(self) -> None:
        while self._queue and (self._queue[0].dropped or self._queue[0].future.done()):
            p = self._queue.popleft()
            self._drop(p)

    async def _wait_for_batch(self) -> None:
        """Wait until a full batch is queued, the oldest request's delay is over, or we are stopping.

        Sequential traffic does not wait: when the previous batch held a single request and this one is
        alone in the queue, nothing suggests another is on its way, and the delay would only add latency.
        """
        assert self._wakeup is not None
        first = self._queue[0]
        if self._last_batch_requests == 1 and len(self._queue) == 1:
            return
        while not self._closing and self._queued < self.max_batch_size:
            left = first.enqueued + self.max_delay_s - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return
            if first.dropped:
                return

    def _take_batch(self) -> list[_Pending]:
        """Pop requests in arrival order up to ``max_batch_size`` samples (at least one request)."""
        batch: list[_Pending] = []
        total = 0
        now = time.monotonic()
        while self._queue:
            p = self._queue[0]
            if p.dropped or p.future.done():
                self._drop(self._queue.popleft())
                continue
            if batch and total + p.size > self.max_batch_size:
                break
            self._queue.popleft()
            self._drop(p)  # no longer waiting
            if p.deadline <= now:
                p.future.set_exception(QueueTimeout("the request waited in the queue past its deadline"))
                continue
            p.started = now
            self._on_wait(now - p.enqueued)
            batch.append(p)
            total += p.size
        return batch
