"""The compiled engine behind HTTP: same answers as the reference engine, its choice shown in the model's
metadata, the fallback when a network cannot be compiled, and a run-time failure that never reaches a client."""

from __future__ import annotations

import httpx
import pytest

from service.serving.compiled import CompiledCascadeRunner, EngineBuildError
from service.serving.compiled import factory as compiled_factory
from tests.api.conftest import MODEL, make_settings, sample_pngs, serve

PNGS = sample_pngs(24)


async def _classify_all(client: httpx.AsyncClient, profile: str | None) -> list[tuple[int, int, float]]:
    out = []
    for png in PNGS:
        params = {"profile": profile} if profile else {}
        r = await client.post("/classify", content=png, headers={"Content-Type": "image/png"}, params=params)
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        out.append((p["class_index"], p["exit_index"], p["flops"]))
    return out


async def _profiles(client: httpx.AsyncClient) -> list[str]:
    r = await client.get("/profiles")
    return [p["name"] for p in r.json()["profiles"] if p["mode"] == "cm"]


async def test_compiled_engine_serves_the_reference_answers(tiny_store):
    async with serve(make_settings(tiny_store, engine="torch")) as ref:
        names = await _profiles(ref.client)
        picked = [names[len(names) // 3], names[2 * len(names) // 3], "full"]
        want = {n: await _classify_all(ref.client, n) for n in picked}
    async with serve(make_settings(tiny_store, engine="onnx")) as s:
        meta = (await s.client.get(f"/v2/models/{MODEL}")).json()["parameters"]["engine"]
        assert meta["engine"] == "onnx" and meta["requested"] == "onnx" and meta["reason"] is None
        runner = s.state.engine.snapshot.runner
        assert isinstance(runner, CompiledCascadeRunner)
        assert runner.builder.wait_idle(timeout=600)  # every profile's sessions built in the background
        for n in picked:
            got = await _classify_all(s.client, n)
            assert [g[:2] for g in got] == [w[:2] for w in want[n]]  # class and exit
            assert [g[2] for g in got] == pytest.approx([w[2] for w in want[n]])  # FLOPs
        assert runner.reference_batches >= 0 and runner.failures == 0


def _refuse_to_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise EngineBuildError("cannot compile segment main[0..3]+cm: stage 'layer1.0' failed (injected)",
                               segment="main[0..3]+cm", stage="layer1.0")

    monkeypatch.setattr(compiled_factory, "CompiledCascadeRunner", refuse)


async def test_auto_falls_back_to_torch_with_the_reason(tiny_store, monkeypatch):
    _refuse_to_compile(monkeypatch)
    async with serve(make_settings(tiny_store, engine="auto")) as s:
        meta = (await s.client.get(f"/v2/models/{MODEL}")).json()["parameters"]["engine"]
        assert meta["engine"] == "torch" and meta["requested"] == "auto"
        assert "layer1.0" in meta["reason"] and meta["failed_stage"] == "layer1.0"
        assert (await s.client.post("/classify", content=PNGS[0], headers={"Content-Type": "image/png"})
                ).status_code == 200


async def test_onnx_explicitly_requested_and_impossible_is_not_ready(tiny_store, monkeypatch):
    _refuse_to_compile(monkeypatch)
    async with serve(make_settings(tiny_store, engine="onnx")) as s:
        r = await s.client.get("/v2/health/ready")
        assert r.status_code == 503
        assert "layer1.0" in s.state.not_ready_reason and "onnx engine" in s.state.not_ready_reason


async def test_a_failing_engine_call_is_re_run_on_the_reference_engine(tiny_store):
    async with serve(make_settings(tiny_store, engine="onnx")) as s:
        want = await _classify_all(s.client, "full")
        runner = s.state.engine.snapshot.runner
        for key in runner.sessions:
            session = runner.sessions.get(key)

            def broken(*args, **kwargs):
                raise RuntimeError("injected ONNX Runtime failure")

            session.run = broken  # type: ignore[method-assign]
        got = await _classify_all(s.client, "full")
        assert [g[:2] for g in got] == [w[:2] for w in want]
        assert runner.failures == len(PNGS)
        assert (await s.client.get("/v2/health/ready")).status_code == 200
        meta = (await s.client.get(f"/v2/models/{MODEL}")).json()["parameters"]["engine"]
        assert meta["failures"] == len(PNGS) and "injected" in meta["last_failure"]
