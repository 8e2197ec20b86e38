"""Failures in the middle of a class-means job, and crashes in the middle of a bundle write.

``failing_jobs``: one server (fault harness); for each injected failure point a job uploaded with a good
archive fails there (an exception in the calibration, or a full disk at each step of the bundle write and of the
activation). Afterwards the store is byte-identical to before, the serving state (bundle, operating
point, version) is unchanged, and the same images get the same answers: each answer equals, for that image,
the answer of a profile that may serve (the point; either vertex of a time-shared mix, since the mix routes
each image to one of them; any hull point while the autopilot is engaged), asked before the fault with the
``profile`` override (:func:`bench.rel.common.answer_problems`).

``sigkill_points``: for each point of the bundle write, a server reaches it during a job and hangs
there; it is SIGKILLed. The next server on the same store must come up ready with the bundle
``active.json`` named at the moment of the kill (the previous bundle before the ``active.json`` rename,
the new one after it), no ``*.tmp`` leftovers, and, when the previous bundle serves, the same answers.
"""

from __future__ import annotations

from pathlib import Path

from bench.fault_server import POINTS
from bench.rel.common import (
    FAULT_MODULE,
    ScenarioResult,
    ServingPoints,
    Timer,
    answers_match,
    copy_store,
    dataset_zip,
    model_classes,
    read_active,
    serving_points,
    serving_state,
    store_digest,
    tmp_leftovers,
    upload,
    wait_for,
    wait_job,
)
from bench.servers import Server, classmeans_server

FAIL_POINTS = ("calibrating", "staging_partial", "staged", "published", "active_tmp")
KILL_POINTS = ("staging_partial", "staged", "published", "active_tmp", "activated")


def failing_jobs(model_dir: Path, work: Path, points: tuple[str, ...] = FAIL_POINTS,
                 per_class: int = 10) -> ScenarioResult:
    """One server; for each point, a job that fails there must leave everything as it was."""
    res = ScenarioResult("a recompute job failing part-way changes nothing")
    archive = dataset_zip(model_classes(model_dir), per_class)
    control = work / "control"
    with Timer(res):
        store = copy_store(model_dir, work)
        mdir = store / model_dir.name
        env = {"CLASSMEANS_FAULT_CONTROL": str(control)}
        with classmeans_server(store, model_dir.name, work / "failing-jobs.log", module=FAULT_MODULE,
                               extra_env=env, torch_threads=1, warmup="false") as srv:
            for point in points:
                assert point in POINTS
                before = store_digest(mdir)
                state0, points0 = serving_state(srv), serving_points(srv)
                control.write_text(f"fail:{point}")
                r = upload(srv, archive)
                if not res.check(f"{point}: upload accepted (202)", r.status_code == 202, r.text[:200]):
                    continue
                job = wait_job(srv, r.json()["id"])
                control.write_text("")
                err = job.get("error") or {}
                res.check(f"{point}: job failed with a reason", job["state"] == "failed" and bool(err.get("code")),
                          f"{job['state']} {err}")
                res.figures[f"{point}: job error"] = err
                res.check(f"{point}: serving state unchanged", serving_state(srv) == state0, serving_state(srv))
                problems = answers_match(srv, points0)
                res.check(f"{point}: same answers ({points0.describe()})", not problems, problems[:3])
                with srv.client() as c:
                    res.check(f"{point}: still ready", c.get("/v2/health/ready").status_code == 200)
                diff = sorted(set(before.items()) ^ set(store_digest(mdir).items()))
                res.check(f"{point}: store byte-identical", not diff, diff[:4])
    return res


def sigkill_points(model_dir: Path, work: Path, points: tuple[str, ...] = KILL_POINTS,
                   per_class: int = 10) -> ScenarioResult:
    """A chain of servers on one store: each is SIGKILLed at the next point; its successor is the restart
    that must serve the bundle ``active.json`` named at the kill (and is then killed at the next point)."""
    res = ScenarioResult("SIGKILL during a bundle write: the last good bundle loads")
    archive = dataset_zip(model_classes(model_dir), per_class)
    control = work / "control"
    reached = Path(str(control) + ".reached")
    env = {"CLASSMEANS_FAULT_CONTROL": str(control)}
    with Timer(res):
        store = copy_store(model_dir, work)
        mdir = store / model_dir.name
        expected: tuple[str, str, ServingPoints | None] | None = None  # (point, bundle, answers) of the last kill
        for i, point in enumerate((*points, None)):
            control.write_text("")
            reached.unlink(missing_ok=True)
            log = work / f"server-{i}.log"
            with classmeans_server(store, model_dir.name, log, module=FAULT_MODULE, extra_env=env,
                                   torch_threads=1, warmup="false") as srv:
                if expected is not None:
                    _check_restart(res, srv, mdir, log, *expected)
                if point is None:
                    break
                assert point in POINTS
                old = serving_state(srv)
                answers0 = serving_points(srv)
                control.write_text(f"kill:{point}")
                r = upload(srv, archive)
                if not res.check(f"{point}: upload accepted (202)", r.status_code == 202, r.text[:200]):
                    break
                wait_for(reached.exists, 300, f"the job to reach {point}", interval_s=0.05)
                active_at_kill = read_active(mdir)["bundle"]
                srv.kill()
                res.figures[f"{point}: at the kill"] = {"active_json_bundle": active_at_kill,
                                                        "tmp_files_left_by_the_crash": len(tmp_leftovers(mdir))}
            expect_new = point == "activated"
            res.check(f"{point}: active.json names the {'new' if expect_new else 'previous'} bundle at the kill",
                      (active_at_kill != old["bundle"]) == expect_new, active_at_kill)
            expected = (point, active_at_kill, None if expect_new else answers0)
    return res


def _check_restart(res: ScenarioResult, srv: Server, mdir: Path, log: Path, point: str, bundle: str,
                   answers: ServingPoints | None) -> None:
    now = serving_state(srv)
    with srv.client() as c:
        res.check(f"{point}: restarted server is ready", c.get("/v2/health/ready").status_code == 200)
    res.check(f"{point}: it serves the bundle active.json named", now["bundle"] == bundle,
              f"{now['bundle']} vs {bundle}")
    res.check(f"{point}: no *.tmp left after restart", not tmp_leftovers(mdir), tmp_leftovers(mdir))
    text = log.read_text(errors="replace")
    res.check(f"{point}: no fallback, no traceback in the log", "FALLBACK" not in text and "Traceback" not in text,
              text[-300:])
    if answers is not None:
        problems = answers_match(srv, answers)
        res.check(f"{point}: same answers as before the crash ({answers.describe()})", not problems, problems[:3])
