"""The latency autopilot over HTTP: ``POST /profiles {"latency_slo_ms": ...}`` turns it on (persisted), any
other switch turns it off, bad input changes nothing, its moves stay in memory; and a real server (uvicorn on
127.0.0.1) that engages, moves under load and disengages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from service.serving.autopilot import LatencyWindow
from service.serving.autopilot_runtime import AutopilotRuntime
from tests.api.conftest import AUTH, MODEL, assert_envelope, make_settings, sample_pngs, serve, store_digest
from tests.api.test_e2e import metric, start, stop
from tests.factories import REPO


def active_json(model_dir: Path) -> dict:
    return json.loads((model_dir / "active.json").read_text())


class FakeClock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("body,status,code", [
    ({"latency_slo_ms": 0}, 422, "invalid_target"),
    ({"latency_slo_ms": -10}, 422, "invalid_target"),
    ({"latency_slo_ms": 0.5}, 422, "invalid_target"),
    ({"latency_slo_ms": 60_001}, 422, "invalid_target"),
    ({"latency_slo_ms": "fast"}, 422, "invalid_target"),
    ({"latency_slo_ms": 100, "name": "full"}, 422, "invalid_target"),
    ({"latency_slo_ms": 100, "max_flops_fraction": 0.5}, 422, "invalid_target"),
    ({"latency_slo_ms": 100, "min_accuracy": 1.5}, 422, "invalid_target"),
    ({"latency_slo_ms": 100, "mode": "bogus"}, 422, "unknown_mode"),
    ({"latency_slo_ms": 100, "mode": "ic_prob"}, 409, "mode_unavailable"),  # the tiny store has no ICs
])
async def test_bad_input_keeps_the_previous_state(tiny_store: Path, body, status, code):
    async with serve(make_settings(tiny_store)) as s:
        r = await s.client.post("/profiles", json={"latency_slo_ms": 50}, headers=AUTH)  # on, then a bad request
        assert r.status_code == 200, r.text
        before = store_digest(tiny_store)
        snap = s.state.engine.snapshot
        assert_envelope(await s.client.post("/profiles", json=body, headers=AUTH), status, code)
        assert store_digest(tiny_store) == before
        got = (await s.client.get("/profiles")).json()["autopilot"]
        assert got["enabled"] and got["target_ms"] == 50 and s.state.engine.snapshot.version == snap.version


async def test_a_floor_no_profile_meets_is_refused(tiny_store: Path):
    async with serve(make_settings(tiny_store)) as s:
        for p in s.state.engine.snapshot.bundle.profiles:  # the tiny store's first exit is perfect (1.0) on its
            p.accuracy = min(p.accuracy, 0.99)  # synthetic images: cap the estimates so 0.995 is out of reach
        before = store_digest(tiny_store)
        r = await s.client.post("/profiles", json={"latency_slo_ms": 100, "min_accuracy": 0.995}, headers=AUTH)
        assert_envelope(r, 422, "floor_unreachable")
        assert store_digest(tiny_store) == before
        assert (await s.client.get("/profiles")).json()["autopilot"]["enabled"] is False


async def test_needs_the_admin_token(served):
    r = await served.client.post("/profiles", json={"latency_slo_ms": 100})
    assert_envelope(r, 401, "unauthorized")


async def test_engage_is_persisted_and_any_other_switch_turns_it_off(tiny_store: Path):
    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.get("/profiles")).json()["autopilot"]["enabled"] is False
        v0 = s.state.engine.snapshot.version
        r = await s.client.post("/profiles", json={"latency_slo_ms": 80, "min_accuracy": 0.5, "mode": "cm"},
                                headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == v0 + 1 and body["autopilot"]["enabled"]
        saved = active_json(s.model_dir)
        assert saved["version"] == v0 + 1
        assert saved["autopilot"] == {"latency_slo_ms": 80.0, "min_accuracy": 0.5, "mode": "cm"}
        info = (await s.client.get("/profiles")).json()["autopilot"]
        assert info["enabled"] and info["target_ms"] == 80 and info["min_accuracy"] == 0.5 and info["mode"] == "cm"
        point = info["operating_point"]
        assert info["floor_flops_fraction"] <= point["flops_fraction"] <= info["ceiling_flops_fraction"]
        assert info["operating"] == point["name"] and info["axis"] == "flops"  # the tiny store is untimed
        assert info["operating_point"]["accuracy"] >= 0.5 and isinstance(info["why"], str)
        assert s.state.metrics.autopilot_enabled.labels(MODEL)._value.get() == 1

        r = await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["autopilot"]["enabled"] is False
        assert "autopilot" not in active_json(s.model_dir) and active_json(s.model_dir)["version"] == v0 + 2
        assert (await s.client.get("/profiles")).json()["autopilot"]["enabled"] is False
        assert s.state.metrics.autopilot_enabled.labels(MODEL)._value.get() == 0


async def test_a_restarted_process_follows_the_persisted_configuration(tiny_store: Path):
    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 120}, headers=AUTH)).status_code == 200
    async with serve(make_settings(tiny_store)) as s:
        info = (await s.client.get("/profiles")).json()["autopilot"]
        assert info["enabled"] and info["target_ms"] == 120


async def test_moves_stay_in_memory_and_answers_name_the_point(tiny_store: Path):
    """Drive the runtime by hand on a fake clock: slow answers cut the FLOPs budget, with no write to
    active.json and no version bump; quiet ones bring it back up. A per-request profile still wins."""
    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
        r = await s.client.post("/profiles", json={"latency_slo_ms": 10}, headers=AUTH)
        assert r.status_code == 200
        await s.state.autopilot.stop()  # replace the live loop by one we tick ourselves
        clock = FakeClock()
        window = LatencyWindow(clock=clock)
        rt = AutopilotRuntime(s.state.engine, s.state.batcher, window, s.state.metrics, clock=clock)
        s.state.autopilot = rt
        rt.follow()
        ceiling = rt.state.controller.ceiling
        assert rt.state.controller.f == ceiling  # starts where the service stood (the full network)
        version, before = s.state.engine.snapshot.version, store_digest(tiny_store)
        for _ in range(6):  # 3 s of answers (120/s) at 50 ms against a 10 ms target
            for _ in range(60):
                window.record(0.05, ok=True, now=clock.t)
            clock.t += 0.5
            rt.tick()
        snap = s.state.engine.snapshot
        assert snap.version == version and store_digest(tiny_store) == before
        assert snap.operating.flops_fraction < ceiling and rt.state.controller.moves >= 3
        assert s.state.metrics.autopilot_moves.labels(MODEL, "down")._value.get() >= 3
        assert s.state.metrics.autopilot_flops_fraction.labels(MODEL)._value.get() == snap.operating.flops_fraction
        png = sample_pngs(1)[0]
        c = (await s.client.post("/classify", content=png, headers={"Content-Type": "image/png"})).json()
        assert c["profile"] == snap.profile_name and c["version"] == version
        forced = await s.client.post("/classify?profile=full", content=png, headers={"Content-Type": "image/png"})
        assert forced.json()["profile"] == "full"
        info = (await s.client.get("/profiles")).json()["autopilot"]
        assert info["operating_point"]["name"] == snap.profile_name and info["moves"] == rt.state.controller.moves
        for _ in range(200):  # 100 s of a quiet server
            clock.t += 0.5
            rt.tick()
        assert s.state.engine.snapshot.operating.flops_fraction == pytest.approx(ceiling)
        assert store_digest(tiny_store) == before


async def test_a_persisted_switch_wins_over_a_pending_move(tiny_store: Path):
    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 10}, headers=AUTH)).status_code == 200
        engine = s.state.engine
        stale = engine.snapshot.version
        assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
        assert engine.writer.move_operating(0.02, "cm", stale) is None
        assert engine.snapshot.operating.a == "full" and engine.snapshot.operating.b is None


# -- a real server ------------------------------------------------------------------------------------

def _post_until_moved(c: httpx.Client, png: bytes, rounds: int = 40) -> dict:
    info: dict = {}
    for _ in range(rounds):
        for _ in range(25):
            r = c.post("/classify", content=png, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
        info = c.get("/profiles").json()["autopilot"]
        if info["moves"]:
            break
    return info


def test_real_server_engages_moves_and_disengages(tiny_store_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    store = tmp_path / "store"
    shutil.copytree(tiny_store_root, store)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the server runs this checkout's code
    srv = start(store, tmp_path / "serve.log")
    try:
        png = sample_pngs(1)[0]
        with srv.client() as c:
            assert c.post("/profiles", json={"name": "full"}, headers=AUTH).status_code == 200  # start at the top
            r = c.post("/profiles", json={"latency_slo_ms": 1}, headers=AUTH)  # 1 ms: no real p99 meets it
            assert r.status_code == 200, r.text
            assert r.json()["autopilot"]["enabled"] and active_json(store / MODEL)["autopilot"]["latency_slo_ms"] == 1
            version = r.json()["version"]
            info = _post_until_moved(c, png)
            assert info["moves"] >= 1
            assert info["operating_point"]["flops_fraction"] < info["ceiling_flops_fraction"]
            assert info["operating_point"]["name"] != "full" and info["why"]
            answer = c.post("/classify", content=png, headers={"Content-Type": "image/png"}).json()
            assert answer["version"] == version and answer["profile"] != "full"  # moved in memory, same version
            metrics = c.get("/metrics").text
            assert 'classmeans_autopilot_enabled{model="tiny"} 1.0' in metrics
            assert metric(metrics, "classmeans_autopilot_moves_total", direction="down") >= 1  # 1 ms: it cut

            r = c.post("/profiles", json={"name": "full"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["autopilot"]["enabled"] is False
            assert "autopilot" not in active_json(store / MODEL)
            for _ in range(5):
                a = c.post("/classify", content=png, headers={"Content-Type": "image/png"}).json()
                assert a["profile"] == "full"
            assert c.get("/profiles").json()["autopilot"]["enabled"] is False
    finally:
        stop(srv)


async def test_a_new_version_with_the_same_configuration_keeps_the_controllers_point(tiny_store: Path):
    """What a follower process sees when another process re-persists the same configuration: the controller
    and the point it moved to survive the version bump."""
    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 10}, headers=AUTH)).status_code == 200
        await s.state.autopilot.stop()
        clock = FakeClock()
        window = LatencyWindow(clock=clock)
        rt = AutopilotRuntime(s.state.engine, s.state.batcher, window, s.state.metrics, clock=clock)
        rt.follow()
        for _ in range(3):
            for _ in range(60):
                window.record(0.05, ok=True, now=clock.t)
            clock.t += 0.5
            rt.tick()
        moved, ctl = s.state.engine.snapshot.operating, rt.state.controller
        assert moved.flops_fraction < 1.0
        engine = s.state.engine
        engine.writer.move_operating(1.0, "cm", engine.snapshot.version)  # as a follower adopting a persisted state
        engine.writer.persist_autopilot(rt.state.config.to_json())  # at the full network: a version bump, same config
        assert engine.snapshot.operating != moved
        rt.follow()
        assert rt.state.controller is ctl and rt.state.version == s.state.engine.snapshot.version
        assert s.state.engine.snapshot.operating == moved


async def test_the_configuration_rides_in_the_snapshot_and_the_runtime_never_reads_the_file(
        tiny_store: Path, monkeypatch):
    """Engaging persists the configuration and puts it, parsed, in the snapshot; the runtime engages from the
    snapshot alone (the follower is the one reader of active.json), and a switch without it disengages."""
    import service.store.bundles as bundles

    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.post("/profiles", json={"latency_slo_ms": 80, "min_accuracy": 0.5},
                                    headers=AUTH)).status_code == 200
        snap = s.state.engine.snapshot
        assert snap.autopilot is not None and snap.autopilot.target_ms == 80 and snap.autopilot.min_accuracy == 0.5
        assert active_json(s.model_dir)["autopilot"] == snap.autopilot.to_json()
        await s.state.autopilot.stop()

        def no_reads(*a, **k):
            raise AssertionError("the autopilot read active.json")

        monkeypatch.setattr(bundles, "read_json_or_none", no_reads)  # under read_active, however imported
        rt = AutopilotRuntime(s.state.engine, s.state.batcher, LatencyWindow(), s.state.metrics, clock=FakeClock())
        rt.follow()
        assert rt.state is not None and rt.state.config == snap.autopilot
        monkeypatch.undo()
        assert (await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
        assert s.state.engine.snapshot.autopilot is None
        rt.follow()
        assert rt.state is None
