"""The collector's pauses: the start-up heap is frozen out of full collections, and every pause is timed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading

import pytest

from service.serving.gc_pauses import GcPauses, freeze_startup_heap


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the test process's heap goes back to ordinary collections


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freezing_moves_the_live_heap_out_of_the_collectors_walk(unfrozen):
    gc.unfreeze()
    Cycle()  # garbage: collected before the freeze, never frozen
    held = [Cycle() for _ in range(100)]
    frozen = freeze_startup_heap()
    assert frozen.collected >= 1 and frozen.frozen == gc.get_freeze_count() >= len(held)
    assert frozen.seconds >= 0
    assert all(len(gc.get_objects(g)) < frozen.frozen for g in range(3))  # none walks the frozen heap


def test_every_collection_is_timed_by_generation():
    seen: list[tuple[int, float]] = []
    ticks = iter(range(0, 1000, 2))  # a fake clock: each collection takes 2 "seconds"
    pauses = GcPauses(lambda g, s: seen.append((g, s)), clock=lambda: float(next(ticks))).install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()
    gc.collect(1)  # uninstalled: not seen
    assert seen == []  # nothing is observed from inside a collection (it may hold any lock)
    assert pauses.drain() == 2 and pauses.drain() == 0
    assert [g for g, _ in seen] == [0, 2] and all(s == 2.0 for _, s in seen)
    assert pauses.count == [1, 0, 1] and pauses.max_s == [2.0, 0.0, 2.0] and pauses.total_s[2] == 2.0
    pauses.uninstall()  # twice is harmless


def test_a_stop_without_a_start_is_ignored():
    pauses = GcPauses()
    pauses("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert pauses.count == [0, 0, 0]


def test_the_callback_takes_no_lock_a_collection_may_interrupt():
    lock = threading.Lock()
    seen: list[int] = []

    def observe(generation: int, seconds: float) -> None:  # what prometheus_client does: take a lock
        if not lock.acquire(timeout=0.5):  # (a plain acquire would hang this test, as it hung a worker)
            seen.append(-1)
            return
        try:
            seen.append(generation)
        finally:
            lock.release()

    pauses = GcPauses(observe).install()
    try:
        with lock:  # a collection starting while the lock is held (inside a metric update) must not wait for it
            gc.collect(0)
    finally:
        pauses.uninstall()
    assert pauses.count[0] >= 1 and seen == []
    pauses.drain()
    assert seen and seen[0] == 0 and -1 not in seen


async def test_export_every_drains_on_the_loop_and_once_more_when_cancelled():
    seen: list[int] = []
    pauses = GcPauses(lambda g, s: seen.append(g)).install()
    task = asyncio.create_task(pauses.export_every(0.01))
    try:
        gc.collect(0)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if seen:
                break
        assert 0 in seen
        gc.collect(1)
    finally:
        pauses.uninstall()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert 1 in seen  # the last drain, at cancellation
