"""Profiles on the measured time axis over HTTP: ms in GET /profiles, POST /profiles by a latency target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.api.conftest import AUTH, MODEL, assert_envelope, make_settings, serve
from tests.factories import attach_made_up_timing


async def test_profiles_show_time_and_a_latency_target_switches(tiny_store):
    doc = attach_made_up_timing(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        rows = {p["name"]: p for p in (await s.client.get("/profiles")).json()["profiles"]}
        full = doc["full_ms"]["1"]
        assert rows["full"]["ms"] == pytest.approx(full) and rows["full"]["time_fraction"] == pytest.approx(1.0)
        timed = {n: r for n, r in rows.items() if r["mode"] == "cm"}
        assert all(r["ms"] is not None and set(r["ms_batch"]) == {"1", "32"} for r in timed.values())
        budget = float(np.median([r["ms"] for r in timed.values()]))
        r = await s.client.post("/profiles", json={"max_latency_ms": budget}, headers=AUTH)
        assert r.status_code == 200, r.text
        active = r.json()["active"]
        assert active["ms"] <= budget + 1e-6
        # nothing at most that fast is more accurate than what it chose (the hull's mix can only beat vertices)
        best_vertex = max(p["accuracy"] for p in timed.values() if p["ms"] <= budget + 1e-9)
        assert active["accuracy"] >= best_vertex - 1e-9
        served = (await s.client.get("/profiles")).json()["active"]
        assert served["name"] == active["name"] and served["ms"] == pytest.approx(active["ms"])
        r = await s.client.post("/profiles", json={"max_time_fraction": 1.0}, headers=AUTH)
        assert r.json()["active"]["accuracy"] == pytest.approx(max(p["accuracy"] for p in timed.values()))


async def test_latency_targets_that_cannot_be_met_say_what_can(tiny_store):
    doc = attach_made_up_timing(tiny_store / MODEL)
    async with serve(make_settings(tiny_store, engine="torch")) as s:
        before = (await s.client.get("/profiles")).json()["version"]
        fastest = min(p["ms"]["1"] for p in doc["profiles"].values())
        r = await s.client.post("/profiles", json={"max_latency_ms": fastest / 2}, headers=AUTH)
        body = assert_envelope(r, 422, "target_unreachable")
        assert "fastest" in body["error"]["message"]
        for bad in ({"max_latency_ms": 5, "name": "full"}, {"max_latency_ms": -1}, {"max_time_fraction": 0},
                    {"max_latency_ms": 5, "mode": "ic_prob"}):
            assert_envelope(await s.client.post("/profiles", json=bad, headers=AUTH), 422, "invalid_target")
        assert (await s.client.get("/profiles")).json()["version"] == before


async def test_an_untimed_bundle_refuses_time_targets(served):
    rows = (await served.client.get("/profiles")).json()["profiles"]
    assert all(p["ms"] is None for p in rows)
    r = await served.client.post("/profiles", json={"max_latency_ms": 5.0}, headers=AUTH)
    body = assert_envelope(r, 409, "no_time_axis")
    assert "classmeans timing" in body["error"]["message"]


async def test_serve_can_re_measure_the_time_axis_at_start(tiny_store):
    doc = attach_made_up_timing(tiny_store / MODEL)  # made-up times: 1-3 ms per stage, far from this machine's
    async with serve(make_settings(tiny_store, engine="onnx", measure_time=True)) as s:
        timing = s.state.engine.snapshot.bundle.timing
        assert timing["remeasured_at_start"] is True and timing["engine"] == "onnx"
        assert timing["full_ms"]["1"] != doc["full_ms"]["1"]
        rows = {p["name"]: p for p in (await s.client.get("/profiles")).json()["profiles"]}
        assert rows["full"]["ms"] == pytest.approx(timing["full_ms"]["1"], rel=1e-5)
        for name, p in doc["profiles"].items():
            assert timing["profiles"][name]["exit_share"] == p["exit_share"]  # shares are kept, times re-costed
    on_disk = json.loads(next((tiny_store / MODEL / "bundles").glob("*/timing.json")).read_text())
    assert on_disk["full_ms"] == doc["full_ms"]  # the file stays as `classmeans timing` measured it
