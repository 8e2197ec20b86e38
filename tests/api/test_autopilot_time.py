"""The latency autopilot on the measured time axis, over HTTP: a target below what the cheapest allowed point
needs at batch 1 is a 422 ``slo_unreachable`` that says what is reachable; GET /profiles reports the axis, the
point, p99, shed rate, capacity and why it moved; the controller (driven by hand on a fake clock) moves along
the accuracy-time hull; admission control sheds with a fast 503 + Retry-After only while it is engaged; and a
real server sheds under a burst, then climbs back to full accuracy."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.earlyexit.time_axis import select_by_time
from service.serving.admission import HTTP_OVERHEAD_MS, Shed
from service.serving.autopilot import LatencyWindow
from service.serving.autopilot_runtime import ROOM, AutopilotRuntime
from service.serving.time_profiles import full_ms, operating_ms, operating_time_fraction, time_fractions
from tests.api.conftest import AUTH, MODEL, assert_envelope, make_settings, sample_pngs, serve, store_digest
from tests.api.test_autopilot_api import FakeClock
from tests.api.test_e2e import metric, start, stop
from tests.factories import GRADED_FRACTIONS, REPO, attach_graded_profiles

PNG = {"Content-Type": "image/png"}


def reachable_ms(doc: dict) -> float:
    """The smallest target the autopilot accepts with no floor: the fastest profile's batch-1 ms + overhead
    (the graded profiles are all on the hull)."""
    return min(p["ms"]["1"] for p in doc["profiles"].values()) + HTTP_OVERHEAD_MS


async def hand_driven(s: Any, target_ms: float) -> tuple[AutopilotRuntime, FakeClock, list[float]]:
    """Engage ``target_ms`` from the full network, then replace the live runtime with one driven by hand: a
    fake clock and a CPU clock (``cpu[0]``, seconds) that the test advances; returns them."""
    assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
    assert (await s.client.post("/profiles", json={"latency_slo_ms": target_ms}, headers=AUTH)).status_code == 200
    await s.state.autopilot.stop()
    clock, cpu = FakeClock(), [0.0]
    rt = AutopilotRuntime(s.state.engine, s.state.batcher, LatencyWindow(clock=clock), s.state.metrics,
                          clock=clock, wall_clock=clock, cores=1.0, cpu_clock=lambda: cpu[0])
    s.state.autopilot = rt
    rt.follow()
    return rt, clock, cpu


async def test_a_target_below_the_floor_point_is_refused_and_says_what_is_reachable(tiny_store: Path):
    doc = attach_graded_profiles(tiny_store / MODEL)
    reach = reachable_ms(doc)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        before = store_digest(tiny_store)
        r = await s.client.post("/profiles", json={"latency_slo_ms": reach * 0.9}, headers=AUTH)
        body = assert_envelope(r, 422, "slo_unreachable")
        msg = body["error"]["message"]
        assert "reachable" in msg and f"{reach:.3g}" in msg and "HTTP overhead" in msg
        assert store_digest(tiny_store) == before
        assert (await s.client.get("/profiles")).json()["autopilot"]["enabled"] is False
        # a floor raises what is reachable: the cheapest point at least that accurate (g2 of the ladder)
        floor_acc = 0.5 + 0.4 * GRADED_FRACTIONS[2] ** 0.5
        reach_floor = GRADED_FRACTIONS[2] * doc["full_ms"]["1"] + HTTP_OVERHEAD_MS
        r = await s.client.post("/profiles", json={"latency_slo_ms": reach_floor - 0.1, "min_accuracy": floor_acc},
                                headers=AUTH)
        assert f"{reach_floor:.3g}" in assert_envelope(r, 422, "slo_unreachable")["error"]["message"]
        r = await s.client.post("/profiles", json={"latency_slo_ms": reach_floor + 0.1, "min_accuracy": floor_acc},
                                headers=AUTH)
        assert r.status_code == 200 and r.json()["autopilot"]["floor_point"] == "g2", r.text
        r = await s.client.post("/profiles", json={"latency_slo_ms": reach * 1.01}, headers=AUTH)
        assert r.status_code == 200, r.text
        info = r.json()["autopilot"]
        assert info["enabled"] and info["axis"] == "time" and info["reachable_ms"] == pytest.approx(reach)


async def test_get_profiles_reports_the_contract_fields(tiny_store: Path):
    doc = attach_graded_profiles(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
        r = await s.client.post("/profiles", json={"latency_slo_ms": 200, "min_accuracy": 0.7}, headers=AUTH)
        assert r.status_code == 200, r.text
        ap = (await s.client.get("/profiles")).json()["autopilot"]
        for key in ("enabled", "latency_slo_ms", "p99_ms", "shed_rate", "operating", "reason"):
            assert key in ap, key
        assert ap["enabled"] and ap["latency_slo_ms"] == 200 and ap["shed_rate"] == 0.0
        assert ap["operating"] == "full" and isinstance(ap["reason"], str) and ap["axis"] == "time"
        assert ap["budget"] == pytest.approx(1.0) and ap["ceiling"] == pytest.approx(1.0)
        assert ap["budget_ms"] == pytest.approx(doc["full_ms"]["1"])
        assert ap["floor"] <= ap["budget"] and ap["accuracy"] == ap["operating_point"]["accuracy"]
        # before anything is measured the capacity comes from timing.json (batch 1 while nothing ran)
        assert ap["capacity_rps"] == pytest.approx(1000 / doc["full_ms"]["1"], rel=1e-3)
        assert ap["floor_capacity_rps"] >= ap["capacity_rps"] and ap["queue_bound"] >= 0


async def test_the_controller_moves_along_the_time_hull_on_a_fake_clock(tiny_store: Path):
    attach_graded_profiles(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        rt, clock, cpu = await hand_driven(s, 40)  # cpu: 0.1 core fixed + (0.8 ms + network) per sample, by hand
        window = rt.window
        engine = s.state.engine
        bundle = engine.snapshot.bundle
        assert rt.state.axis == "time" and rt.state.controller.f == pytest.approx(1.0)
        overhead_s, fixed, full_s = 0.0008, 0.1, full_ms(bundle) / 1000
        demand = (0.75 - fixed) / (overhead_s + 0.6 * full_s)  # the full network does not fit 0.75 of a core
        budgets, ratios = [], []
        for _ in range(8):  # 4 s of that load, answered at 100 ms against a 40 ms target
            for _ in range(60):
                window.record(0.1, ok=True, now=clock.t)
            n = round(demand * 0.5)
            served = operating_ms(bundle, engine.snapshot.operating) / 1000
            rt.admission.checked_samples += n
            s.state.batcher.stats.samples += n
            cpu[0] += fixed * 0.5 + n * (overhead_s + served)
            ratios.append(fixed * 0.5 / n + overhead_s + served)
            clock.t += 0.5
            rt.tick()
            budgets.append(rt.state.controller.f)
        ctl = rt.state.controller
        assert budgets[-1] < budgets[0] and ctl.moves >= 1 and ctl.planned
        assert rt.fixed_cores == pytest.approx(fixed, abs=0.01)  # the model measured the fixed CPU
        assert ctl.util_cap < 0.75  # 100 ms against 40: the cap was cut below where it started
        assert ctl.predicted_util <= ctl.util_cap * 1.02  # the point fits the cap,
        assert ctl.f <= ctl.f_latency + 1e-12  # and the latency bound (the cap spent, the p99 still over)
        op = engine.snapshot.operating
        f = ctl.f
        assert op == select_by_time(bundle.profiles, time_fractions(bundle), f)  # the point is the time budget's
        assert operating_time_fraction(bundle, op) <= f + 1e-9
        info = (await s.client.get("/profiles")).json()["autopilot"]
        assert info["budget"] == pytest.approx(f) and info["operating"] == op.name
        assert info["budget_ms"] == pytest.approx(f * full_ms(bundle))
        assert operating_ms(bundle, op) <= info["budget_ms"] + 1e-6
        assert info["planned"] and "utilisation" in info["reason"]
        assert info["demand_sps"] == pytest.approx(demand, rel=0.05)
        util = min(0.95, ctl.util_cap + 0.1)
        want = info["bucket_scale"] * (util - info["fixed_cores"]) / (info["unit_cost_ms"] / 1000)
        assert info["admit_rate_sps"] == pytest.approx(want, rel=1e-6)
        assert min(ratios) * demand * 0.9 <= info["cpu_util"] <= max(ratios) * demand * 1.1  # the CPU measured
        trace = (await s.client.get("/ui/api/autopilot")).json()
        assert trace["enabled"] and len(trace["ticks"]) == 4  # one record a second of the fake clock
        last = trace["ticks"][-1]
        assert last["target_ms"] == 40 and last["axis"] == "time" and last["budget"] == pytest.approx(f)
        assert last["operating"] == op.name and last["p99_ms"] == pytest.approx(100, rel=0.01)
        since = trace["ticks"][-3]["t"]
        assert len((await s.client.get(f"/ui/api/autopilot?since={since}")).json()["ticks"]) == 2
        for _ in range(200):  # 100 s of a quiet server: back to the full network
            clock.t += 0.5
            rt.tick()
        assert engine.snapshot.operating.name == "full" and rt.state.controller.f == pytest.approx(1.0)
        assert len(rt.trace) <= rt.trace.maxlen


async def test_admission_sheds_with_503_and_retry_after_only_while_engaged(tiny_store: Path):
    attach_graded_profiles(tiny_store / MODEL)
    png = sample_pngs(1)[0]
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 100}, headers=AUTH)).status_code == 200
        rt, batcher = s.state.autopilot, s.state.batcher
        await rt.stop()  # hold the configuration still: no tick re-measures it

        def busy() -> None:  # a batch of 32 just started, 10 ms a sample: 320 ms of work ahead
            rt.admission.configure(0.1, 0.01, 0.0, batcher.max_batch_size)
            batcher.running_samples, batcher.running_since = 32, time.monotonic()

        busy()
        r = await s.client.post("/classify", content=png, headers=PNG)
        assert_envelope(r, 503, "shed")
        assert int(r.headers["Retry-After"]) >= 1
        text = (await s.client.get("/metrics")).text
        assert metric(text, "classmeans_shed_requests_total") == 1
        assert metric(text, "classmeans_rejected_total", reason="shed") == 1
        assert (await s.client.get("/profiles")).json()["autopilot"]["shed_total"] == 1
        stats = (await s.client.get("/ui/api/stats")).json()
        assert stats["rejected"]["shed"] == 1
        batcher.running_samples, batcher.running_since = 0, None
        assert (await s.client.post("/classify", content=png, headers=PNG)).status_code == 200

        assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
        assert rt.state is None and not rt.admission.active  # off: admission is disarmed with it
        batcher.running_samples, batcher.running_since = 32, time.monotonic()
        r = await s.client.post("/classify", content=png, headers=PNG)  # the same backlog, no target: served
        batcher.running_samples, batcher.running_since = 0, None
        assert r.status_code == 200, r.text
        assert rt.admission.shed == 1


async def test_a_would_be_refusal_moves_the_point_down_at_once_instead(tiny_store: Path):
    attach_graded_profiles(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        rt, clock, cpu = await hand_driven(s, 400)
        batcher, engine = s.state.batcher, s.state.engine
        for _ in range(3):  # a light load (20 samples/s x 22 ms: 0.44 of the core): the full network fits
            rt.admission.checked_samples += 5
            batcher.stats.samples += 5
            cpu[0] += 0.01
            clock.t += 0.25
            rt.tick()
        ctl, bundle, adm = rt.state.controller, engine.snapshot.bundle, rt.admission
        assert ctl.planned and ctl.f == pytest.approx(1.0)
        relieved_f = ctl.floor + 0.75 * (ctl.f - ctl.floor)
        relieved_op = select_by_time(bundle.profiles, time_fractions(bundle), relieved_f)
        per_full, per_relieved = rt.per_sample_s(), rt.per_sample_s(relieved_op)
        assert per_full is not None and per_relieved is not None and per_relieved < per_full

        def expected(queued: int, per: float) -> float:
            keep, adm.per_sample_s = adm.per_sample_s, per
            try:
                return adm.expected_s(queued, 0.0, 1)
            finally:
                adm.per_sample_s = keep

        bound = adm.bound_s()
        queued = next(q for q in range(1, 1_000_000)
                      if expected(q, per_full) > bound and expected(q, per_relieved) <= bound)
        try:
            batcher._queued = queued  # refused at the full network's price, in time at the relieved point's
            rt.admit(1)  # admitted: the point moved down first
            assert ctl.f == pytest.approx(relieved_f) and engine.snapshot.operating == relieved_op
            assert adm.shed == 0 and adm.relieved == adm.relieved_admitted == 1
            assert adm.per_sample_s == pytest.approx(per_relieved)  # admission repriced at the new point
            info = (await s.client.get("/profiles")).json()["autopilot"]
            assert info["relief_moves"] == 1 and info["relieved_admitted"] == 1
            assert info["reason"].startswith("relief") and info["operating"] == relieved_op.name
            batcher._queued = 100 * queued  # a backlog no point helps, within the relief gap: refused
            with pytest.raises(Shed):
                rt.admit(1)
            assert ctl.f == pytest.approx(relieved_f) and adm.shed == adm.shed_by_queue == 1 and adm.relieved == 1
        finally:
            batcher._queued = 0
        for _ in range(8):  # the planned ticks take the budget back up at that light load
            clock.t += 0.25
            rt.tick()
        assert ctl.f == pytest.approx(1.0)


# -- a real server ------------------------------------------------------------------------------------

BURST = 160  # concurrent requests, once
CLIMB_CAP_S = 90.0  # a bound on the wait, not a performance goal (a loaded 2-core machine)


async def _burst(url: str, png: bytes) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False, limits=limits) as c:
        return await asyncio.gather(*(c.post("/classify", content=png, headers=PNG) for _ in range(BURST)))


def test_real_server_sheds_a_burst_and_returns_to_full_accuracy(tiny_store_root: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    store = tmp_path / "store"
    shutil.copytree(tiny_store_root, store)
    attach_graded_profiles(store / MODEL)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    srv = start(store, tmp_path / "serve.log", env_extra={"CLASSMEANS_ENGINE": "torch"})
    try:
        png = sample_pngs(1)[0]
        with srv.client() as c:
            assert c.post("/profiles", json={"name": "full"}, headers=AUTH).status_code == 200
            full_acc = c.get("/profiles").json()["active"]["accuracy"]
            r = c.post("/profiles", json={"latency_slo_ms": 25}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["autopilot"]["axis"] == "time"
            for _ in range(20):  # a few answers so the cost per sample is measured on this machine
                assert c.post("/classify", content=png, headers=PNG).status_code == 200
            time.sleep(0.6)
        codes: list[int] = []
        for _ in range(3):  # a burst far over what any point serves within 25 ms
            answers = asyncio.run(_burst(srv.url, png))
            codes += [a.status_code for a in answers]
            shed = [a for a in answers if a.status_code == 503]
            for a in shed:
                assert a.json()["error"]["code"] == "shed" and int(a.headers["Retry-After"]) >= 1
            if shed:
                break
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, sorted(set(codes))
        with srv.client() as c:
            text = c.get("/metrics").text
            assert metric(text, "classmeans_shed_requests_total") == codes.count(503)
            deadline = time.monotonic() + CLIMB_CAP_S
            ap = c.get("/profiles").json()["autopilot"]
            while time.monotonic() < deadline:
                assert c.post("/classify", content=png, headers=PNG).status_code == 200  # light load
                ap = c.get("/profiles").json()["autopilot"]
                if ap["operating"] == "full":
                    break
                time.sleep(0.25)
            assert ap["operating"] == "full" and ap["accuracy"] == pytest.approx(full_acc), ap
            assert ap["enabled"] and ap["shed_total"] == codes.count(503)
    finally:
        stop(srv)


async def test_engaging_asks_for_the_sessions_of_every_point_it_may_serve(tiny_store: Path, monkeypatch):
    attach_graded_profiles(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        asked: list[list[str]] = []
        monkeypatch.setattr(s.state.engine, "prebuild", lambda names: asked.append(list(names)) or 0)
        r = await s.client.post("/profiles", json={"latency_slo_ms": 40, "min_accuracy": 0.5}, headers=AUTH)
        assert r.status_code == 200, r.text
        plan = s.state.autopilot.state.plan
        assert len(asked) == 1
        fs = {p.name: p.flops_fraction for p in plan.candidates}
        assert set(asked[0]) <= set(fs) and asked[0]  # hull vertices only
        inside = {n for n, f in fs.items() if plan.floor - 1e-12 <= f <= plan.ceiling + 1e-12}
        assert inside <= set(asked[0])  # every vertex between floor and ceiling (and the two around them)


async def test_the_bucket_is_trimmed_while_the_cpu_is_saturated_and_refusing(tiny_store: Path):
    attach_graded_profiles(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 40}, headers=AUTH)).status_code == 200
        rt = s.state.autopilot
        await rt.stop()  # no tick moves the point meanwhile
        rt.cpu_util, rt.shed_rate = 0.99 * rt.cores, 0.3
        ctl = rt.state.controller
        assert ctl.f > ctl.floor
        rt._scale_bucket()
        assert rt.bucket_scale == 1.0  # above the floor a cheaper point is the answer, not fewer admissions
        ctl.f = ctl.floor
        for _ in range(20):
            rt._scale_bucket()
        assert rt.bucket_scale == pytest.approx(0.5)  # at the floor: 10 % a tick, down to half the model's rate
        rt.shed_rate = 0.0
        rt._scale_bucket()
        assert rt.bucket_scale == pytest.approx(0.5)  # saturated but refusing nothing: no change
        rt.cpu_util = 0.5 * rt.cores
        for _ in range(30):
            rt._scale_bucket()
        assert rt.bucket_scale == 1.0  # unsaturated: back to the model's rate


async def test_the_bucket_guard_defers_to_an_answered_p99_well_inside_the_target(tiny_store: Path):
    """Under overload the refusals keep the core busy whatever is admitted: the guard trims only while the
    answered p99 is not well inside the target or a backlog builds (under ROOM of it, with no backlog past
    the rest of the target, the latency has room, and it grows back)."""
    attach_graded_profiles(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 40}, headers=AUTH)).status_code == 200
        rt = s.state.autopilot
        await rt.stop()
        ctl = rt.state.controller
        ctl.f = ctl.floor
        rt.cpu_util, rt.shed_rate = 0.99 * rt.cores, 0.3  # saturated, refusing, at the floor
        roomy, tight = 0.5 * ROOM * ctl.target_s, 1.01 * ROOM * ctl.target_s
        for _ in range(5):
            rt._scale_bucket(roomy)
        assert rt.bucket_scale == 1.0  # the answered p99 is well inside: no trim
        for _ in range(3):
            rt._scale_bucket(tight)
        assert rt.bucket_scale == pytest.approx(0.9 ** 3)  # not inside ROOM of the target: trimmed
        rt._scale_bucket(None)
        assert rt.bucket_scale == pytest.approx(0.9 ** 4)  # no p99 yet: the CPU alone decides, as before
        rt._scale_bucket(roomy, 1.01 * (1 - ROOM) * ctl.target_s)
        assert rt.bucket_scale == pytest.approx(0.9 ** 5)  # a backlog the answered p99 cannot show yet: trimmed
        for _ in range(12):
            rt._scale_bucket(roomy)
        assert rt.bucket_scale == 1.0  # room again: back to the model's rate, though the CPU is still pegged
