"""Serving the internal-classifier decision modes (``cm``, ``ic_prob``, ``ic_entropy``, ``combined``).

Served predictions, exits, FLOPs and rules equal the offline :class:`ICDecisionTable` (on the tiny store
with synthetic ICs in CI, and on the embedded default model with its trained ICs and real CIFAR-10 test
images when ``../shared`` has them); profiles of every mode are listed and switched to (by name and by
target within a mode), atomically under concurrent traffic; a broken IC set leaves the class-means
service up and says so; bad input gets a 4xx envelope with a stable code.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.earlyexit.ic_rules import MODES, RULE_NAMES
from service.ingest.labelled import LabelledImages
from service.offline.evaluation import decision_table_for
from service.offline.ic_cache import extract_cache
from service.offline.ics import ic_table_from_cache
from service.serving.snapshot import Snapshot
from service.store.ic_sets import ic_costs
from tests.api.conftest import (
    AUTH,
    MODEL,
    assert_envelope,
    make_settings,
    png_bytes,
    sample_images,
    sample_pngs,
    serve,
)
from tests.factories import CIFAR_DIR, REPO, RESNET56
from tests.oip.helpers import assert_oip_error

IC_MODES = ("ic_prob", "ic_entropy", "combined")
RULES_OF_MODE = {"cm": {"cm", "final"}, "ic_prob": {"ic", "final"}, "ic_entropy": {"ic", "final"},
                 "combined": {"ic", "cm", "ic+cm", "final"}}


def files(blobs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def mode_of(snap: Snapshot, name: str) -> str:
    return snap.mode_of(name)


def cm_thresholds(snap: Snapshot, name: str) -> torch.Tensor:
    """``(1, M - 1)`` thresholds of a class-means profile, as stored in the bundle (``full``: all off)."""
    if name in snap.bundle.profile_names():
        return torch.tensor(snap.bundle.profile(name).thresholds, dtype=torch.float32).unsqueeze(0)
    return torch.ones(1, snap.bundle.num_exits - 1)


def expected_flops(snap: Snapshot, name: str, exit_index: int) -> float:
    """FLOPs of a sample of profile ``name`` that left at backbone exit ``exit_index``."""
    if snap.ic is None or name not in snap.ic.profiles:
        t = cm_thresholds(snap, name)
        return float(snap.bundle.costs.per_exit(t)[0, exit_index])
    want = snap.ic.expected_flops(name, exit_index)
    assert want is not None, f"{name} cannot leave at exit {exit_index}"
    return want


def offline(engine, images: np.ndarray, labels: np.ndarray, name: str) -> dict[str, list]:
    """The offline decision of profile ``name`` on ``images``: backbone exit, prediction, FLOPs, rule."""
    snap = engine.snapshot
    net, bundle, norm = engine.net, snap.bundle, engine.normalizer
    data = LabelledImages(images, labels.astype(np.int64), list(engine.spec.classes))
    m = bundle.num_exits
    if snap.ic is None or name not in snap.ic.profiles:
        table = decision_table_for(net, bundle, data, norm)
        t = cm_thresholds(snap, name)
        ex = table.exit_indices(t)[0]
        rows = torch.arange(len(labels))
        return {"exit": ex.tolist(), "pred": table.pred[rows, ex].tolist(),
                "flops": bundle.costs.per_exit(t)[0][ex].tolist(),
                "rule": ["final" if int(e) == m - 1 else "cm" for e in ex]}
    store = engine.ic_store
    p = snap.ic.profiles[name]
    ics = store.ics
    cache = extract_cache(net, images, data.labels, norm, ics.exits, cm_heads=bundle.heads)
    table = ic_table_from_cache(ics, cache)
    costs = ic_costs(store.stage_profile, ics, bundle.heads)
    t = torch.tensor([p.thresholds["ic"], p.thresholds["cm"]]) if p.mode == "combined" else torch.tensor(
        p.thresholds)
    off = table.decide(p.mode, t, costs)
    exits = [*ics.exits, m - 1]
    return {"exit": [exits[int(e)] for e in off["exit"]], "pred": off["pred"].tolist(),
            "flops": off["flops"].tolist(), "rule": [RULE_NAMES[int(r)] for r in off["rule"]]}


async def classify_all(client, images: np.ndarray, profile: str, chunk: int = 32) -> list[dict]:
    preds: list[dict] = []
    for lo in range(0, len(images), chunk):
        r = await client.post(f"/classify?profile={profile}", files=files([png_bytes(im) for im in
                                                                          images[lo:lo + chunk]]))
        assert r.status_code == 200, r.text
        preds += r.json()["predictions"]
    return preds


def pick_profiles(snap: Snapshot, per_mode: int = 2) -> dict[str, list[str]]:
    """Per mode, ``per_mode`` profiles spread over its hull (cheap to accurate)."""
    out: dict[str, list[str]] = {"cm": []}
    cm = sorted(snap.bundle.profiles, key=lambda p: p.flops)
    out["cm"] = [cm[len(cm) // 3].name, cm[(2 * len(cm)) // 3].name]
    for mode in IC_MODES:
        ps = sorted((p for p in snap.ic.profiles.values() if p.mode == mode), key=lambda p: p.flops)
        idx = sorted({round(float(q) * (len(ps) - 1)) for q in np.linspace(0.25, 0.75, per_mode)})
        out[mode] = [ps[i].name for i in idx]
    return out


async def check_served_equals_offline(s, images: np.ndarray, labels: np.ndarray) -> dict[str, set[str]]:
    engine = s.state.engine
    snap = engine.snapshot
    m = snap.bundle.num_exits
    seen_rules: dict[str, set[str]] = {}
    for mode, names in pick_profiles(snap).items():
        for name in names:
            got = await classify_all(s.client, images, name)
            want = offline(engine, images, labels, name)
            assert [p["exit_index"] for p in got] == want["exit"], name
            assert [p["class_index"] for p in got] == want["pred"], name
            assert [p["rule"] for p in got] == want["rule"], name
            assert np.allclose([p["flops"] for p in got], want["flops"], rtol=1e-9), name
            for p in got:
                assert p["profile"] == name and p["mode"] == mode and p["num_exits"] == m
                assert p["exit_name"] == snap.bundle.exit_names[p["exit_index"]]
                assert p["flops_fraction"] == pytest.approx(p["flops"] / snap.bundle.costs.full)
                assert p["top_k"][0]["index"] == p["class_index"]
                assert p["top_k"][0]["probability"] == pytest.approx(p["confidence"], abs=1e-6)
            seen_rules.setdefault(mode, set()).update(p["rule"] for p in got)
            assert seen_rules[mode] <= RULES_OF_MODE[mode]
    return seen_rules


# -- the tiny store with synthetic ICs (always runs) ----------------------------------------------------

@pytest.fixture()
async def ic_served(tiny_ic_store):
    async with serve(make_settings(tiny_ic_store)) as s:
        yield s


async def test_profiles_of_every_mode_are_listed(ic_served):
    body = (await ic_served.client.get("/profiles")).json()
    assert body["modes"] == list(MODES)
    ic = body["internal_classifiers"]
    assert ic["status"] == "loaded" and ic["exits"] == [1, 2, 4, 5, 7, 8] and "unavailable" not in ic
    snap = ic_served.state.engine.snapshot
    assert ic["id"] == snap.ic.ics_id and ic["profiles_bundle"] == snap.bundle_id
    by_mode: dict[str, list[dict]] = {}
    for p in body["profiles"]:
        by_mode.setdefault(p["mode"], []).append(p)
    assert set(by_mode) == set(MODES)
    assert [p["name"] for p in by_mode["cm"]] == snap.bundle.profile_names()
    for mode in IC_MODES:
        for p in by_mode[mode]:
            assert p["name"].startswith(f"{mode}-") and p["exits"] == ic["exits"]
            assert 0 < p["flops_fraction"] < 1.0 and 0.0 <= p["accuracy"] <= 1.0
            thr = p["thresholds"]
            if mode == "combined":
                assert set(thr) == {"ic", "cm"} and len(thr["ic"]) == len(thr["cm"]) == 6
            else:
                assert len(thr) == 6
    names = [p["name"] for p in body["profiles"]]
    assert len(names) == len(set(names)) and names.count("full") == 1
    meta = (await ic_served.client.get(f"/v2/models/{MODEL}")).json()
    assert meta["parameters"]["internal_classifiers"]["status"] == "loaded"
    assert "rule" in [o["name"] for o in meta["outputs"]]


async def test_served_equals_offline_table_in_every_mode(ic_served):
    images, labels = sample_images(48)
    rules = await check_served_equals_offline(ic_served, images, labels)
    assert set(rules) == set(MODES)
    assert "ic" in rules["ic_prob"] | rules["ic_entropy"] | rules["combined"]


async def test_switch_by_name_and_by_target_within_a_mode(ic_served):
    c = ic_served.client
    snap = ic_served.state.engine.snapshot
    name = pick_profiles(snap)["ic_entropy"][0]
    r = await c.post("/profiles", json={"name": name}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["active"]["name"] == name
    active = json.loads((ic_served.model_dir / "active.json").read_text())
    assert active["operating"] == {"a": name}
    body = (await c.post("/classify", files=files(sample_pngs(4)))).json()
    assert body["profile"] == name and {p["mode"] for p in body["predictions"]} == {"ic_entropy"}
    assert {p["rule"] for p in body["predictions"]} <= {"ic", "final"}
    listing = (await c.get("/profiles")).json()
    assert [p["name"] for p in listing["profiles"] if p["active"]] == [name]

    # A target within a mode: the cheapest point / a time-shared mix on that mode's hull (+ the plain network).
    r = await c.post("/profiles", json={"min_accuracy": 0.0, "mode": "combined"}, headers=AUTH)
    assert r.status_code == 200, r.text
    cheapest = min((p for p in snap.ic.profiles.values() if p.mode == "combined"), key=lambda p: p.flops)
    assert r.json()["active"]["name"] == cheapest.name
    ps = sorted((p for p in snap.ic.profiles.values() if p.mode == "ic_prob"), key=lambda p: p.flops)
    mid = (ps[0].flops_fraction + ps[1].flops_fraction) / 2 if len(ps) > 1 else (ps[0].flops_fraction + 1) / 2
    r = await c.post("/profiles", json={"max_flops_fraction": mid, "mode": "ic_prob"}, headers=AUTH)
    assert r.status_code == 200, r.text
    op = r.json()["active"]
    assert op["b"] is not None and op["flops_fraction"] == pytest.approx(mid)
    assert {snap.mode_of(op["a"]), snap.mode_of(op["b"]) if op["b"] != "full" else "ic_prob"} == {"ic_prob"}
    body = (await c.post("/classify", files=files(sample_pngs(16)))).json()
    assert body["operating"]["name"] == op["name"]
    assert {p["profile"] for p in body["predictions"]} <= {op["a"], op["b"]}
    # Back to a class-means profile, then the v2 protocol with a per-request IC profile.
    r = await c.post("/profiles", json={"max_flops_fraction": 0.6}, headers=AUTH)
    assert r.status_code == 200 and mode_of(ic_served.state.engine.snapshot, r.json()["active"]["a"]) == "cm"
    x = ic_served.state.engine.normalizer(sample_images(1)[0])
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
    out = (await c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [inp], "parameters": {"profile": name}})).json()
    params = out["parameters"]
    assert params["profile"] == name and params["mode"] == "ic_entropy" and params["rule"] in {"ic", "final"}
    assert params["flops"] == pytest.approx(expected_flops(ic_served.state.engine.snapshot, name,
                                                           params["exit_layer"]))
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["rule"]["data"] == [params["rule"]] and outputs["exit_layer"]["data"] == [params["exit_layer"]]


async def test_ic_operating_point_survives_a_restart(tiny_ic_store):
    async with serve(make_settings(tiny_ic_store)) as s:
        name = pick_profiles(s.state.engine.snapshot)["combined"][-1]
        op = (await s.client.post("/profiles", json={"name": name}, headers=AUTH)).json()
    async with serve(make_settings(tiny_ic_store)) as s:
        listing = (await s.client.get("/profiles")).json()
        assert listing["active"]["name"] == name and listing["version"] == op["version"]
        body = (await s.client.post("/classify", files=files(sample_pngs(2)))).json()
        assert body["profile"] == name and {p["mode"] for p in body["predictions"]} == {"combined"}


async def test_rule_is_a_metrics_label(ic_served):
    snap = ic_served.state.engine.snapshot
    name = pick_profiles(snap)["ic_prob"][0]
    await ic_served.client.post(f"/classify?profile={name}", files=files(sample_pngs(8)))
    await ic_served.client.post("/classify?exits=off", files=files(sample_pngs(2)))
    text = (await ic_served.client.get("/metrics")).text
    from prometheus_client.parser import text_string_to_metric_families

    fam = next(f for f in text_string_to_metric_families(text) if f.name == "classmeans_samples")
    ic_rows = [s for s in fam.samples if s.labels["profile"] == name]
    assert sum(s.value for s in ic_rows) == 8
    assert {s.labels["rule"] for s in ic_rows} <= {"ic", "final"}
    for s in ic_rows:
        assert (s.labels["rule"] == "final") == (s.labels["exit"] == "10")
    full = [s for s in fam.samples if s.labels["profile"] == "full"]
    assert [(s.labels["exit"], s.labels["rule"], s.value) for s in full] == [("10", "final", 2.0)]


@pytest.mark.parametrize("body,status,code", [
    ({"name": "no-such-profile"}, 404, "profile_not_found"),
    ({"min_accuracy": 0.5, "mode": "sdn"}, 422, "unknown_mode"),
    ({"name": "full", "mode": "bogus"}, 422, "unknown_mode"),
    ({"max_flops_fraction": 0.01, "mode": "ic_prob"}, 422, "target_unreachable"),
    ({"mode": "ic_prob"}, 422, "invalid_target"),
])
async def test_bad_switches_are_clear_4xx(ic_served, body, status, code):
    before = ic_served.state.engine.snapshot
    r = await ic_served.client.post("/profiles", json=body, headers=AUTH)
    assert_envelope(r, status, code)
    assert ic_served.state.engine.snapshot is before


async def test_mode_mismatch_and_unknown_per_request_profile(ic_served):
    snap = ic_served.state.engine.snapshot
    name = pick_profiles(snap)["ic_prob"][0]
    r = await ic_served.client.post("/profiles", json={"name": name, "mode": "combined"}, headers=AUTH)
    assert_envelope(r, 422, "mode_mismatch")
    r = await ic_served.client.post("/classify?profile=ic_prob-999", files=files(sample_pngs(1)))
    body = assert_envelope(r, 404, "profile_not_found")
    assert name in body["error"]["message"]  # the message lists what exists, IC profiles included
    inp = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}
    r = await ic_served.client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [inp],
                                                                         "parameters": {"profile": "ic_nope"}})
    assert_oip_error(r, 404, "profile_not_found")


async def test_switching_between_cm_and_ic_modes_under_concurrency(ic_served):
    """Clients classify while an operator cycles through profiles of every mode and targets within modes:
    every response names one published (bundle, profile, version), and each sample's mode, rule and
    FLOPs belong to that profile."""
    c = ic_served.client
    engine = ic_served.state.engine
    snap0 = engine.snapshot
    picks = pick_profiles(snap0)
    cycle: list[dict] = []
    for mode in MODES:
        cycle += [{"name": n} for n in picks[mode]]
    cycle += [{"max_flops_fraction": 0.5, "mode": "ic_prob"}, {"min_accuracy": 0.3, "mode": "combined"},
              {"max_flops_fraction": 0.5}]
    published = {snap0.version: (snap0.profile_name, snap0.operating.a, snap0.operating.b)}
    blobs = sample_pngs(6)
    responses: list[dict] = []
    stop = asyncio.Event()
    seen_versions: set[int] = set()
    progress = asyncio.Condition()

    async def operator() -> None:
        for i in range(3 * len(cycle)):
            r = await c.post("/profiles", json=cycle[i % len(cycle)], headers=AUTH)
            assert r.status_code == 200, r.text
            op = r.json()["active"]
            version = r.json()["version"]
            published[version] = (op["name"], op["a"], op["b"])
            async with progress:  # every published state serves at least one response before the next
                await progress.wait_for(lambda v=version: v in seen_versions)
        stop.set()

    async def client(k: int) -> None:
        i = 0
        while not stop.is_set() or i < 2:
            r = await c.post("/classify", files=files(blobs[: 1 + (i + k) % len(blobs)]))
            assert r.status_code == 200, r.text
            responses.append({"body": r.json(), "headers": dict(r.headers)})
            async with progress:
                seen_versions.add(r.json()["version"])
                progress.notify_all()
            i += 1

    await asyncio.gather(operator(), *(client(k) for k in range(4)))
    assert len(published) == 3 * len(cycle) + 1 and len(responses) >= 8
    modes_seen = set()
    for resp in responses:
        body = resp["body"]
        name, a, b = published[body["version"]]
        assert body["profile"] == name and resp["headers"]["x-classmeans-profile"] == name
        assert body["bundle"] == snap0.bundle_id == resp["headers"]["x-classmeans-bundle"]
        assert resp["headers"]["x-classmeans-version"] == str(body["version"])
        for p in body["predictions"]:
            assert p["profile"] in {a, b}
            mode = mode_of(snap0, p["profile"])
            assert p["mode"] == mode and p["rule"] in RULES_OF_MODE[mode]
            assert p["flops"] == pytest.approx(expected_flops(snap0, p["profile"], p["exit_index"]), rel=1e-12)
            modes_seen.add(mode)
    assert modes_seen == set(MODES)


async def test_combined_needs_the_bundle_it_was_searched_with(ic_served):
    """Activating another bundle keeps ic_prob/ic_entropy (no class means) but withdraws combined."""
    c = ic_served.client
    snap = ic_served.state.engine.snapshot
    src = ic_served.model_dir / "bundles" / snap.bundle_id
    other = "29990101T000000-000000-copy"
    shutil.copytree(src, src.parent / other)
    r = await c.post(f"/admin/bundles/{other}/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    body = (await c.get("/profiles")).json()
    assert body["bundle"] == other and body["modes"] == ["cm", "ic_prob", "ic_entropy"]
    assert "combined" in body["internal_classifiers"]["unavailable"]
    assert {p["mode"] for p in body["profiles"]} == {"cm", "ic_prob", "ic_entropy"}
    r = await c.post("/profiles", json={"max_flops_fraction": 0.5, "mode": "combined"}, headers=AUTH)
    assert_envelope(r, 409, "mode_unavailable")
    name = pick_profiles(snap)["combined"][0]
    assert_envelope(await c.post("/profiles", json={"name": name}, headers=AUTH), 404, "profile_not_found")
    r = await c.post(f"/admin/bundles/{snap.bundle_id}/activate", headers=AUTH)
    assert r.status_code == 200 and (await c.get("/profiles")).json()["modes"] == list(MODES)


# -- no ICs, broken ICs ---------------------------------------------------------------------------------

async def test_without_ics_only_class_means_modes_are_served(served):
    body = (await served.client.get("/profiles")).json()
    assert body["modes"] == ["cm"] and body["internal_classifiers"]["status"] == "absent"
    assert {p["mode"] for p in body["profiles"]} == {"cm"}
    r = await served.client.post("/profiles", json={"max_flops_fraction": 0.5, "mode": "ic_entropy"}, headers=AUTH)
    body = assert_envelope(r, 409, "mode_unavailable")
    assert "no internal classifiers" in body["error"]["message"]
    r = await served.client.post("/profiles", json={"max_flops_fraction": 0.5, "mode": "cm"}, headers=AUTH)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("damage", ["tensors", "profiles", "weights"])
async def test_a_broken_ic_set_leaves_class_means_serving(tiny_ic_store, damage, caplog):
    model_dir = tiny_ic_store / MODEL
    (path,) = list((model_dir / "ics").iterdir())
    if damage == "tensors":
        blob = bytearray((path / "ics.safetensors").read_bytes())
        blob[-3] ^= 0xFF
        (path / "ics.safetensors").write_bytes(bytes(blob))
    elif damage == "profiles":
        stored = json.loads((path / "profiles.json").read_text())
        stored["modes"]["ic_prob"][0]["thresholds"] = [0.5]  # wrong length
        (path / "profiles.json").write_text(json.dumps(stored))
    else:
        meta = json.loads((path / "ics.json").read_text())
        meta["weights_sha256"] = "0" * 64
        (path / "ics.json").write_text(json.dumps(meta))
    async with serve(make_settings(tiny_ic_store)) as s:
        assert (await s.client.get("/readyz")).status_code == 200
        body = (await s.client.get("/profiles")).json()
        ic = body["internal_classifiers"]
        assert ic["status"] == "failed" and ic["error"] and body["modes"] == ["cm"]
        assert {p["mode"] for p in body["profiles"]} == {"cm"}
        meta = (await s.client.get(f"/v2/models/{MODEL}")).json()
        assert meta["parameters"]["internal_classifiers"]["status"] == "failed"
        r = await s.client.post("/classify", files=files(sample_pngs(2)))
        assert r.status_code == 200 and {p["mode"] for p in r.json()["predictions"]} == {"cm"}
        assert_envelope(await s.client.post("/profiles", json={"min_accuracy": 0.1, "mode": "ic_prob"},
                                            headers=AUTH), 409, "mode_unavailable")
    assert any("DOES NOT LOAD" in rec.getMessage() for rec in caplog.records)


async def test_an_active_ic_profile_that_vanished_falls_back(tiny_ic_store):
    async with serve(make_settings(tiny_ic_store)) as s:
        name = pick_profiles(s.state.engine.snapshot)["ic_prob"][0]
        assert (await s.client.post("/profiles", json={"name": name}, headers=AUTH)).status_code == 200
    shutil.rmtree(tiny_ic_store / MODEL / "ics")
    async with serve(make_settings(tiny_ic_store)) as s:
        body = (await s.client.get("/profiles")).json()
        assert body["active"]["name"] == body["default_profile"] and body["modes"] == ["cm"]


# -- the embedded default model, its trained ICs, real CIFAR-10 test images -----------------------------

@pytest.fixture()
def default_store(tmp_path) -> Path:
    src = REPO / "model_store" / RESNET56
    dst = tmp_path / "store" / RESNET56
    shutil.copytree(src, dst)
    return dst.parent


def test_default_model_ships_ics_small_enough_for_git():
    ics = list((REPO / "model_store" / RESNET56 / "ics").iterdir())
    assert len(ics) == 1
    sizes = {p.name: p.stat().st_size for p in ics[0].iterdir()}
    assert set(sizes) == {"ics.json", "ics.safetensors", "profiles.json"}
    assert sum(sizes.values()) < 512 * 1024
    stored = json.loads((ics[0] / "profiles.json").read_text())
    active = json.loads((REPO / "model_store" / RESNET56 / "active.json").read_text())
    assert stored["bundle"] == active["bundle"] and stored["selection_samples"] == 5000


@pytest.mark.cifar
async def test_default_model_served_equals_offline_on_cifar(default_store):
    with np.load(CIFAR_DIR / "test.npz") as d:
        images, labels = d["images"][:160].copy(), d["labels"][:160].copy()
    async with serve(make_settings(default_store, model=RESNET56)) as s:
        body = (await s.client.get("/profiles")).json()
        assert body["modes"] == list(MODES) and body["internal_classifiers"]["status"] == "loaded"
        rules = await check_served_equals_offline(s, images, labels)
        assert "ic" in rules["ic_prob"] and "ic" in rules["combined"] and "cm" in rules["cm"]
