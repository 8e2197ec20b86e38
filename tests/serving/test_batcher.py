"""The dynamic batcher on its own (no torch): gathering, limits, exact overload accounting, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.serving.batcher import Batcher, BatcherClosed, DeadlineExceeded, Overloaded, QueueTimeout


class Recorder:
    """A run function that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, payloads: list[object]) -> list[object]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(payloads))
        return [p if not isinstance(p, str) or p != "boom" else ValueError("bad item") for p in payloads]


def far() -> float:
    return time.monotonic() + 30


async def test_concurrent_requests_share_one_batch():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, max_delay_s=0.2, queue_size=64)
    await b.start()
    try:
        results = await asyncio.gather(*(b.submit(i, 1, far()) for i in range(5)))
    finally:
        await b.stop()
    assert [r.result for r in results] == [0, 1, 2, 3, 4]
    assert rec.batches == [[0, 1, 2, 3, 4]]
    assert all(r.batch_samples == 5 for r in results)


async def test_full_batch_does_not_wait_for_the_delay():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=4, max_delay_s=30.0, queue_size=64)
    await b.start()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(b.submit(i, 2, far()) for i in range(2))), 10)
    finally:
        await b.stop()
    assert len(rec.batches) == 1 and len(results) == 2


async def test_batches_never_exceed_max_batch_size():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=3, max_delay_s=0.05, queue_size=64)
    await b.start()
    try:
        await asyncio.gather(*(b.submit(i, 1, far()) for i in range(10)))
    finally:
        await b.stop()
    assert sorted(x for batch in rec.batches for x in batch) == list(range(10))  # type: ignore[type-var]
    assert max(len(batch) for batch in rec.batches) <= 3


async def test_overload_count_is_exact():
    """One request running, ``queue_size`` waiting: every further request is refused at once."""
    rec = Recorder()
    rec.gate.clear()
    queue_size, extra = 4, 7
    b = Batcher(rec, max_batch_size=1, max_delay_s=0.0, queue_size=queue_size)
    await b.start()
    try:
        running = asyncio.create_task(b.submit("first", 1, far()))
        await asyncio.to_thread(rec.entered.wait, 10)
        queued = [asyncio.create_task(b.submit(i, 1, far())) for i in range(queue_size)]
        await asyncio.sleep(0.01)
        assert b.queued_samples == queue_size and not b.has_room(1)
        refused = 0
        for i in range(extra):
            with pytest.raises(Overloaded):
                await b.submit(100 + i, 1, far())
            refused += 1
        assert refused == extra
        rec.gate.set()
        done = await asyncio.gather(running, *queued)
        assert len(done) == 1 + queue_size
    finally:
        rec.gate.set()
        await b.stop()
    assert b.queued_samples == 0


async def test_queued_request_past_its_deadline_never_runs():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch_size=1, max_delay_s=0.0, queue_size=8)
    await b.start()
    try:
        blocker = asyncio.create_task(b.submit("blocker", 1, far()))
        await asyncio.to_thread(rec.entered.wait, 10)
        with pytest.raises(QueueTimeout):
            await b.submit("late", 1, time.monotonic() + 0.05)
        assert b.queued_samples == 0
        rec.gate.set()
        await blocker
    finally:
        rec.gate.set()
        await b.stop()
    assert ["late"] not in rec.batches


async def test_running_request_past_its_deadline_is_answered_504():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch_size=1, max_delay_s=0.0, queue_size=8)
    await b.start()
    try:
        with pytest.raises(DeadlineExceeded):
            await b.submit("slow", 1, time.monotonic() + 0.2)
    finally:
        rec.gate.set()
        await b.stop()


async def test_an_item_error_fails_only_that_request():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, max_delay_s=0.05, queue_size=8)
    await b.start()
    try:
        ok, bad = await asyncio.gather(b.submit("ok", 1, far()), b.submit("boom", 1, far()),
                                       return_exceptions=True)
    finally:
        await b.stop()
    assert ok.result == "ok"  # type: ignore[union-attr]
    assert isinstance(bad, ValueError)


async def test_a_crashing_run_fails_the_batch_and_the_batcher_goes_on():
    calls = []

    def run(payloads: list[object]) -> list[object]:
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("torch exploded")
        return payloads

    b = Batcher(run, max_batch_size=4, max_delay_s=0.0, queue_size=8)
    await b.start()
    try:
        with pytest.raises(RuntimeError):
            await b.submit(1, 1, far())
        assert (await b.submit(2, 1, far())).result == 2
    finally:
        await b.stop()


async def test_stop_drains_queued_work_then_refuses():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=2, max_delay_s=0.05, queue_size=8)
    await b.start()
    tasks = [asyncio.create_task(b.submit(i, 1, far())) for i in range(5)]
    await asyncio.sleep(0)
    await b.stop(timeout=10)
    assert sorted(t.result().result for t in tasks) == [0, 1, 2, 3, 4]
    with pytest.raises(BatcherClosed):
        await b.submit(9, 1, far())


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError):
        Batcher(lambda p: p, max_batch_size=0, max_delay_s=0.0, queue_size=1)


async def test_sequential_requests_do_not_wait_for_the_delay():
    """After a batch of one request, a lone request runs at once (the delay only helps concurrent traffic)."""
    rec = Recorder()
    b = Batcher(rec, max_batch_size=2, max_delay_s=30.0, queue_size=64)
    await b.start()
    try:
        await asyncio.wait_for(b.submit("a", 2, far()), 10)  # a full batch: no wait, one request
        for x in ("b", "c"):
            await asyncio.wait_for(b.submit(x, 1, far()), 10)  # would take 30 s if it waited
    finally:
        await b.stop()
    assert rec.batches == [["a"], ["b"], ["c"]]


async def test_the_batcher_counts_its_own_refusals():
    """Every refusal is reported through ``on_reject`` by the batcher itself, once, with its reason."""
    rec = Recorder()
    rec.gate.clear()
    reasons: list[str] = []
    b = Batcher(rec, max_batch_size=1, max_delay_s=0.0, queue_size=1, on_reject=reasons.append)
    await b.start()
    try:
        running = asyncio.create_task(b.submit("first", 1, far()))
        await asyncio.to_thread(rec.entered.wait, 10)
        with pytest.raises(QueueTimeout):  # waits in the queue past its deadline
            await b.submit("late", 1, time.monotonic() + 0.05)
        queued = asyncio.create_task(b.submit("queued", 1, far()))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            b.admit(1)
        with pytest.raises(Overloaded):
            await b.submit("over", 1, far())
        assert reasons == ["queue_timeout", "overloaded", "overloaded"]
        rec.gate.set()
        await asyncio.gather(running, queued)
    finally:
        rec.gate.set()
        await b.stop()
    with pytest.raises(BatcherClosed):
        b.admit(1)
    assert reasons == ["queue_timeout", "overloaded", "overloaded"]  # closing is not an overload
