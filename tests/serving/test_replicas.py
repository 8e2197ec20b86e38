"""Replicas of the store, in process: the writers' lock, compare-and-swap of ``active.json``, the follower
(adopts newer versions, ignores torn or malformed files), two engines on one store switching at once, and
job records shared through the store (one job at a time, abandoned jobs reported failed).

Every wait is a bounded poll with a generous cap and a failure message; nothing asserts on speed."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from service.control.jobs import JobInProgress, JobManager
from service.serving.engine import Engine
from service.serving.follower import ActiveFollower
from service.store.active import active_version, update_active
from service.store.bundles import BundleError, read_active
from service.store.locks import StoreBusy, StoreReadOnly, lock_path, store_lock

CAP_S = 60.0


def wait_for(cond, what: str, cap_s: float = CAP_S) -> None:
    deadline = time.monotonic() + cap_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {cap_s:g} s waiting for: {what}")
        time.sleep(0.05)


# -- the lock and compare-and-swap --------------------------------------------------------------------------------


def _hold_lock(model_dir: str, held: multiprocessing.Event, release: multiprocessing.Event) -> None:
    with store_lock(Path(model_dir)):
        held.set()
        release.wait(60)


def test_lock_held_by_another_process_times_out_with_store_busy(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    proc.start()
    try:
        assert held.wait(60), "the child never took the lock"
        with pytest.raises(StoreBusy) as err, store_lock(tmp_path, timeout_s=0.2):
            pass
        assert err.value.code == "store_busy"
    finally:
        release.set()
        proc.join(60)
    with store_lock(tmp_path, timeout_s=5):  # released when the holder is done
        pass


def test_lock_of_a_dead_process_is_free(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    proc.start()
    assert held.wait(60)
    proc.kill()
    proc.join(60)
    with store_lock(tmp_path, timeout_s=5):
        pass
    assert lock_path(tmp_path).is_file()


def test_unwritable_store_is_store_read_only(tmp_path, monkeypatch):
    import service.store.locks as locks

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(locks.os, "open", refuse)
    with pytest.raises(StoreReadOnly) as err, store_lock(tmp_path):
        pass
    assert err.value.code == "store_read_only" and "read-only" in str(err.value)


def test_update_active_versions_only_grow_under_concurrent_writers(tmp_path):
    (tmp_path / "active.json").write_text(json.dumps({"bundle": "b0", "version": 5}))
    seen: list[int] = []
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(20):
                out = update_active(tmp_path, lambda stored, base, k=k, i=i: {"bundle": f"b{k}-{i}",
                                                                               "version": base + 1})
                seen.append(out["version"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(seen) == list(range(6, 6 + 80)), "every write got its own version, none lost or repeated"
    assert read_active(tmp_path)["version"] == 85


def test_update_active_aborts_without_writing_and_never_goes_back(tmp_path):
    (tmp_path / "active.json").write_text(json.dumps({"bundle": "b0", "version": 7}))

    def refuse(stored, base):
        raise BundleError("no", code="active_conflict")

    with pytest.raises(BundleError):
        update_active(tmp_path, refuse)
    assert read_active(tmp_path)["version"] == 7
    out = update_active(tmp_path, lambda stored, base: {"bundle": "b1", "version": 2})  # asks for an old version
    assert out["version"] == 8 and read_active(tmp_path)["version"] == 8
    (tmp_path / "active.json").write_text('{"bundle": "b1", "vers')  # torn: the next write replaces it
    assert update_active(tmp_path, lambda stored, base: {"bundle": "b2"})["version"] == 1
    assert active_version(read_active(tmp_path)) == 1


# -- the follower -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_engines(tiny_store_root, tmp_path_factory):
    """Two engines (two replicas, as far as the store knows) over one private copy of the tiny store."""
    import shutil

    store = tmp_path_factory.mktemp("replicas") / "store"
    shutil.copytree(tiny_store_root, store)
    model_dir = store / "tiny"
    return Engine.load(model_dir), Engine.load(model_dir)


def _profiles(engine: Engine) -> list[str]:
    return engine.snapshot.bundle.profile_names()


def test_follower_adopts_a_newer_version_and_ignores_older_ones(two_engines):
    a, b = two_engines
    follower = ActiveFollower(b, interval_s=0.05)
    target = next(p for p in _profiles(a) if p != a.snapshot.profile_name)
    new = a.writer.switch_profile(target)
    assert follower.poll() or b.snapshot.version == new.version
    assert (b.snapshot.version, b.snapshot.profile_name) == (new.version, target)
    assert b.snapshot.bundle is not None and b.snapshot.bundle_id == new.bundle_id
    assert not b.writer.adopt({"bundle": new.bundle_id, "operating": {"a": "full"}, "version": new.version - 1})
    assert b.snapshot.version == new.version, "versions never go back"


@pytest.mark.parametrize("text", ['{"bundle": "x", "operating": {"a": "fu', "not json at all", "[1, 2, 3]",
                                  '{"version": 999}', '{"bundle": "no-such-bundle", "version": 999}',
                                  '{"bundle": "%s", "operating": {"a": "no-such-profile"}, "version": 999}'])
def test_torn_or_malformed_active_json_is_ignored_with_an_error_log(two_engines, text, caplog):
    a, b = two_engines
    path = a.model_dir / "active.json"
    good = path.read_text()
    before = (b.snapshot.version, b.snapshot.bundle_id, b.snapshot.profile_name)
    follower = ActiveFollower(b, interval_s=0.05)
    try:
        path.write_text(text.replace("%s", b.snapshot.bundle_id))
        with caplog.at_level(logging.ERROR, logger="classmeans.follower"):
            assert not follower.poll()
        assert (b.snapshot.version, b.snapshot.bundle_id, b.snapshot.profile_name) == before
        assert any(r.levelno == logging.ERROR and "last good state keeps serving" in r.getMessage()
                   for r in caplog.records), caplog.text
        blank = b.normalizer(__import__("numpy").zeros((1, 32, 32, 3), dtype="uint8"))
        b.snapshot.runner.run(blank, b.snapshot.policies[b.snapshot.profile_name])  # still serves
    finally:
        path.write_text(good)


def test_two_engines_switching_at_once_converge_to_one_state(two_engines):
    a, b = two_engines
    fa, fb = ActiveFollower(a, interval_s=0.02), ActiveFollower(b, interval_s=0.02)
    fa.start(), fb.start()
    history: dict[str, list[int]] = {"a": [], "b": []}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            history["a"].append(a.snapshot.version)
            history["b"].append(b.snapshot.version)
            time.sleep(0.005)

    names = _profiles(a)
    errors: list[BaseException] = []

    def admin(engine: Engine, k: int) -> None:
        try:
            for i in range(15):
                engine.writer.switch_profile(names[(i + k) % len(names)])
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    admins = [threading.Thread(target=admin, args=(e, k)) for k, e in enumerate((a, b))]
    try:
        for t in admins:
            t.start()
        for t in admins:
            t.join(120)
        assert not errors, errors
        stored = read_active(a.model_dir)
        wait_for(lambda: a.snapshot.version == b.snapshot.version == stored["version"],
                 f"both engines at the stored version {stored['version']} (a={a.snapshot.version}, "
                 f"b={b.snapshot.version})")
    finally:
        stop.set()
        watcher.join(10)
        fa.stop(), fb.stop()
    assert a.snapshot.operating_json() == b.snapshot.operating_json() == stored["operating"]
    for name, seq in history.items():
        assert all(x <= y for x, y in itertools.pairwise(seq)), f"{name}'s version went back"


def test_profile_switch_against_a_replaced_bundle_is_refused(two_engines, tmp_path):
    a, b = two_engines
    bid = a.snapshot.bundle_id
    # Another process activates a different bundle: a copy of the active one under a new id.
    import shutil

    other = "20990101T000000-abcdef-copy"
    src = a.model_dir / "bundles" / bid
    shutil.copytree(src, a.model_dir / "bundles" / other)
    try:
        new = a.writer.activate_bundle(other)
        assert b.snapshot.bundle_id == bid and new.version > b.snapshot.version
        with pytest.raises(BundleError) as err:
            b.writer.switch_profile(_profiles(b)[0])
        assert err.value.code == "active_conflict"
        assert read_active(a.model_dir)["bundle"] == other, "the activation was not undone"
        assert ActiveFollower(b).poll() and b.snapshot.bundle_id == other
        b.writer.switch_profile(_profiles(b)[0])  # after following, the switch goes through
    finally:
        a.writer.activate_bundle(bid)
        ActiveFollower(b).poll()
        shutil.rmtree(a.model_dir / "bundles" / other)


# -- jobs in the store --------------------------------------------------------------------------------------------


def test_job_records_are_shared_and_one_job_runs_across_managers(tmp_path):
    one, two = JobManager(model_dir=tmp_path), JobManager(model_dir=tmp_path)
    job = one.reserve("class_means", {"tag": "t"})
    with pytest.raises(JobInProgress) as err:
        two.reserve("class_means")
    assert err.value.job_id == job.id
    seen = two.get(job.id)
    assert seen is not None and seen.state == "receiving" and seen.to_json()["options"] == {"tag": "t"}
    release = threading.Event()
    one.start(job, lambda j: (release.wait(60), {"ok": True})[1])
    wait_for(lambda: two.get(job.id).state == "running", "the running state reaches the other manager")
    release.set()
    wait_for(lambda: two.get(job.id).state == "succeeded", "the result reaches the other manager")
    assert two.get(job.id).result == {"ok": True}
    assert [j.id for j in two.list()] == [job.id]
    nxt = two.reserve("class_means")  # the lock was released with the job
    two.fail(nxt, "upload_failed", "test")
    assert one.get(nxt.id).error == {"code": "upload_failed", "message": "test"}


def _reserve_and_die(model_dir: str, ready: multiprocessing.Event) -> None:
    mgr = JobManager(model_dir=Path(model_dir))
    job = mgr.reserve("class_means", {"tag": "upload"})
    mgr.start(job, lambda j: (time.sleep(600), {})[1])
    ready.set()
    time.sleep(600)


def test_job_of_a_dead_process_is_reported_failed_on_the_next_start(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_reserve_and_die, args=(str(tmp_path), ready))
    proc.start()
    try:
        assert ready.wait(60), "the child never started its job"
        mgr = JobManager(model_dir=tmp_path)
        assert mgr.recover() == [], "a live process's job is not abandoned"
        [running] = [j for j in mgr.list() if j.state == "running"]
    finally:
        proc.kill()
        proc.join(60)
    cleaned: list[str] = []
    assert JobManager(model_dir=tmp_path).recover(lambda rec: cleaned.append(rec["id"])) == [running.id]
    job = JobManager(model_dir=tmp_path).get(running.id)
    assert job.state == "failed" and job.error["code"] == "job_abandoned" and cleaned == [running.id]
    JobManager(model_dir=tmp_path).reserve("class_means")  # the store is free again


def test_abandoned_recompute_job_leaves_the_store_as_it_was(tiny_store):
    import shutil

    from service.control.recompute import KIND, abandoned_cleanup
    from service.store.bundles import list_bundle_ids

    model_dir = tiny_store / "tiny"
    [active] = list_bundle_ids(model_dir)
    started = time.time()
    src = model_dir / "bundles" / active
    written = "20990101T000000-abcdef-upload"  # what the dead job published (its tag, after it started)
    other = "20990101T000000-fedcba-cli"  # someone else's bundle: kept
    for bid in (written, other):
        shutil.copytree(src, model_dir / "bundles" / bid)
        os.utime(model_dir / "bundles" / bid)  # published now (copytree keeps the source's older mtime)
    record = {"id": "class-means-0", "kind": KIND, "options": {"tag": "upload"}, "times": {"created": started}}
    abandoned_cleanup(model_dir)(record)
    assert sorted(list_bundle_ids(model_dir)) == sorted([active, other])
    abandoned_cleanup(model_dir)({**record, "kind": "something_else"})  # only recompute jobs are cleaned
    assert other in list_bundle_ids(model_dir)
