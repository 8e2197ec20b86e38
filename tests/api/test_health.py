"""Liveness, strict readiness, the index, start-up fall-backs (corrupt bundle, nothing loadable), warm-up."""

from __future__ import annotations

import json
import logging
import shutil

from service.store.bundles import list_bundle_ids
from tests.api.conftest import MODEL, assert_envelope, make_settings, sample_pngs, serve
from tests.oip.helpers import assert_oip_error


async def test_live_ready_and_index(served):
    for path in ("/v2/health/live", "/livez"):
        r = await served.client.get(path)
        assert r.status_code == 200 and r.json() == {"live": True}
    for path in ("/v2/health/ready", "/readyz"):
        r = await served.client.get(path)
        assert r.status_code == 200 and r.json() == {"ready": True}
    index = (await served.client.get("/")).json()
    assert index["model"] == MODEL and index["ready"] is True and "classify" in index["endpoints"]
    assert served.state.metrics.up.labels(MODEL)._value.get() == 1
    assert (await served.client.get("/openapi.json")).status_code == 200


async def test_missing_model_is_live_but_never_ready(tmp_path):
    async with serve(make_settings(tmp_path / "empty-store")) as s:
        assert (await s.client.get("/livez")).status_code == 200
        r = await s.client.get("/readyz")
        body = assert_envelope(r, 503, "not_ready")
        assert body["ready"] is False and "not found" in body["error"]["message"]
        assert r.headers["Retry-After"] == "1"
        r = await s.client.post("/classify", content=sample_pngs(1)[0], headers={"content-type": "image/png"})
        assert_envelope(r, 503, "not_ready")
        assert_oip_error(await s.client.get(f"/v2/models/{MODEL}/ready"), 503, "not_ready")  # the OIP body
        assert (await s.client.get("/")).json()["ready"] is False
        assert s.state.metrics.up.labels(MODEL)._value.get() == 0


def _corrupt(model_dir, bundle_id):
    (model_dir / "bundles" / bundle_id / "tensors.safetensors").write_bytes(b"garbage")


async def test_corrupt_active_bundle_falls_back_to_newest_loadable(tiny_store, caplog):
    model_dir = tiny_store / MODEL
    (active_id,) = list_bundle_ids(model_dir)
    older = "20000101T000000-aaaaaa"
    shutil.copytree(model_dir / "bundles" / active_id, model_dir / "bundles" / older)
    _corrupt(model_dir, active_id)
    with caplog.at_level(logging.ERROR, logger="classmeans.engine"):
        async with serve(make_settings(tiny_store)) as s:
            assert (await s.client.get("/readyz")).status_code == 200
            assert s.state.engine.snapshot.bundle_id == older
            assert s.state.engine.snapshot.fallback_from == active_id
            r = await s.client.post("/classify", content=sample_pngs(1)[0], headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.json()["bundle"] == older
    assert any("FALLBACK" in rec.getMessage() for rec in caplog.records)
    assert json.loads((model_dir / "active.json").read_text())["bundle"] == active_id  # start-up writes nothing


async def test_no_loadable_bundle_stays_not_ready(tiny_store):
    model_dir = tiny_store / MODEL
    for bid in list_bundle_ids(model_dir):
        _corrupt(model_dir, bid)
    async with serve(make_settings(tiny_store)) as s:
        body = assert_envelope(await s.client.get("/readyz"), 503, "not_ready")
        assert "corrupt" in body["error"]["message"]
        assert_envelope(await s.client.get("/profiles"), 503, "not_ready")


async def test_startup_sweeps_tmp_leftovers_and_reads_a_corrupt_active_json(tiny_store):
    model_dir = tiny_store / MODEL
    (model_dir / "bundles" / ".half-written.tmp").mkdir()
    (model_dir / ".active.json.x.tmp").write_text("{")
    (model_dir / "active.json").write_text("{not json")
    async with serve(make_settings(tiny_store)) as s:
        assert (await s.client.get("/readyz")).status_code == 200
        assert s.state.engine.snapshot.bundle_id == list_bundle_ids(model_dir)[-1]
    assert not list(model_dir.rglob("*.tmp"))


async def test_warm_up_then_ready(tiny_store):
    async with serve(make_settings(tiny_store, warmup=True)) as s:
        assert (await s.client.get("/readyz")).status_code == 200


async def test_shutdown_flips_readiness_but_serves_until_drained(served):
    served.state.begin_shutdown()
    assert_envelope(await served.client.get("/readyz"), 503, "not_ready")
    assert (await served.client.get("/livez")).status_code == 200
    assert served.state.metrics.up.labels(MODEL)._value.get() == 0
    png = sample_pngs(1)[0]
    r = await served.client.post("/classify", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200  # a request that reached the app before the drain ended is still served
    await served.state.batcher.stop()
    r = await served.client.post("/classify", content=png, headers={"content-type": "image/png"})
    assert_envelope(r, 503, "not_ready")
