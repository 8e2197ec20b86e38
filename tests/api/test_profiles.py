"""``GET/POST /profiles``: listing, switching by name or target (mixes), persistence, atomicity, errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.api.conftest import AUTH, MODEL, assert_envelope, make_settings, sample_pngs, serve, store_digest


def active_json(served) -> dict:
    return json.loads((served.model_dir / "active.json").read_text())


async def test_list_marks_the_active_profile(served):
    r = await served.client.get("/profiles")
    assert r.status_code == 200
    body = r.json()
    snap = served.state.engine.snapshot
    assert body["bundle"] == snap.bundle_id and body["version"] == snap.version
    names = [p["name"] for p in body["profiles"]]
    assert names == snap.bundle.profile_names() and "full" in names
    active = [p for p in body["profiles"] if p["active"]]
    assert [p["name"] for p in active] == [snap.profile_name] and active[0]["share"] == 1.0
    assert body["active"]["name"] == snap.profile_name and body["active"]["b"] is None
    for p in body["profiles"]:
        assert 0.0 <= p["accuracy"] <= 1.0 and 0.0 < p["flops_fraction"] <= 1.0 + 1e-9
        assert len(p["thresholds"]) == 10
    full = next(p for p in body["profiles"] if p["name"] == "full")
    assert full["flops_fraction"] == pytest.approx(1.0)


async def test_switch_by_name_is_persisted_and_served(served):
    v0 = served.state.engine.snapshot.version
    r = await served.client.post("/profiles", json={"name": "full"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["active"]["name"] == "full" and body["version"] == v0 + 1 and body["previous"]["version"] == v0
    assert active_json(served)["operating"] == {"a": "full"} and active_json(served)["version"] == v0 + 1
    c = (await served.client.post("/classify", files=[("file", ("a.png", sample_pngs(1)[0], "image/png"))])).json()
    assert c["profile"] == "full" and c["version"] == v0 + 1
    m = served.state.metrics
    assert m.profile_switches.labels(MODEL)._value.get() == 1
    assert m.active_version.labels(MODEL)._value.get() == v0 + 1


async def test_switch_by_targets(served):
    r = await served.client.post("/profiles", json={"min_accuracy": 0.0}, headers=AUTH)
    assert r.status_code == 200, r.text
    cheapest = min(served.state.engine.snapshot.bundle.profiles, key=lambda p: p.flops_fraction)
    assert r.json()["active"]["name"] == cheapest.name and r.json()["active"]["b"] is None

    r = await served.client.post("/profiles", json={"max_flops_fraction": 0.5}, headers=AUTH)
    assert r.status_code == 200, r.text
    op = r.json()["active"]
    assert op["b"] is not None and 0.0 < op["lam"] < 1.0
    assert op["flops_fraction"] == pytest.approx(0.5)
    assert active_json(served)["operating"] == {"a": op["a"], "b": op["b"], "lam": op["lam"]}

    listing = (await served.client.get("/profiles")).json()
    shares = {p["name"]: p["share"] for p in listing["profiles"]}
    assert shares[op["a"]] == pytest.approx(op["lam"]) and shares[op["b"]] == pytest.approx(1 - op["lam"])

    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(sample_pngs(16))]
    c = (await served.client.post("/classify", files=files)).json()
    assert c["profile"] == op["name"] and c["operating"]["lam"] == pytest.approx(op["lam"])
    served_by = [p["profile"] for p in c["predictions"]]
    assert set(served_by) <= {op["a"], op["b"]}
    assert abs(served_by.count(op["a"]) - op["lam"] * 16) <= 1  # deterministic error-diffusion routing


async def test_mixed_operating_point_survives_a_restart(tiny_store):
    async with serve(make_settings(tiny_store)) as s:
        op = (await s.client.post("/profiles", json={"max_flops_fraction": 0.5}, headers=AUTH)).json()
    async with serve(make_settings(tiny_store)) as s:
        listing = (await s.client.get("/profiles")).json()
        assert listing["active"] == op["active"] and listing["version"] == op["version"]
        assert s.state.metrics.active_info.labels(MODEL, op["bundle"], op["active"]["name"])._value.get() == 1


SWITCH_ERRORS = [
    ({"name": "nope"}, 404, "profile_not_found"),
    ({"name": "full", "min_accuracy": 0.5}, 422, "invalid_target"),
    ({}, 422, "invalid_target"),
    ({"min_accuracy": "high"}, 422, "invalid_target"),
    ({"min_accuracy": 1.5}, 422, "invalid_target"),
    ({"max_flops_fraction": -1}, 422, "invalid_target"),
    ({"profile": "full"}, 422, "invalid_target"),
    (["full"], 422, "validation_error"),
    ({"max_flops_fraction": 0.0001}, 422, "target_unreachable"),
    ({"min_accuracy": 1.0, "_": 1}, 422, "invalid_target"),
]


@pytest.mark.parametrize(("payload", "status", "code"), SWITCH_ERRORS)
async def test_switch_errors_change_nothing(served, payload, status, code):
    before, snap = store_digest(served.store), served.state.engine.snapshot
    r = await served.client.post("/profiles", json=payload, headers=AUTH)
    assert_envelope(r, status, code)
    assert served.state.engine.snapshot is snap and store_digest(served.store) == before


async def test_unreachable_accuracy_target(served):
    r = await served.client.post("/profiles", json={"min_accuracy": 1.0}, headers=AUTH)
    best = max(p.accuracy for p in served.state.engine.snapshot.bundle.profiles)
    if best < 1.0:
        assert_envelope(r, 422, "target_unreachable")
    else:
        assert r.status_code == 200


async def test_not_json_is_refused(served):
    headers = {**AUTH, "content-type": "application/json"}
    r = await served.client.post("/profiles", content=b"{not json", headers=headers)
    assert_envelope(r, 422, "validation_error")


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer"}, {"Authorization": f"Token {AUTH['Authorization'].split()[1]}"},
], ids=["missing", "wrong", "basic", "empty", "other-scheme"])
async def test_switch_needs_the_token(served, headers):
    before = store_digest(served.store)
    r = await served.client.post("/profiles", json={"name": "full"}, headers=headers)
    assert_envelope(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert store_digest(served.store) == before


async def test_every_response_names_one_published_state_under_switching(served):
    """Switch back and forth while classifying: each response's (bundle, profile, version) is one that was
    published, and its per-sample profiles belong to it (no mixed state)."""
    engine = served.state.engine
    published = {(engine.snapshot.bundle_id, engine.snapshot.profile_name, engine.snapshot.version)}
    blobs = sample_pngs(4)

    async def classify(i: int) -> dict:
        r = await served.client.post("/classify", files=[("file", (f"{i}.png", blobs[i % 4], "image/png"))] * 2)
        assert r.status_code == 200, r.text
        return r.json()

    async def switch(i: int) -> None:
        body = {"name": "full"} if i % 2 else {"max_flops_fraction": 0.5}
        r = await served.client.post("/profiles", json=body, headers=AUTH)
        assert r.status_code == 200
        j = r.json()
        published.add((j["bundle"], j["active"]["name"], j["version"]))

    tasks = [classify(i) for i in range(24)] + [switch(i) for i in range(6)]
    results = await asyncio.gather(*tasks)
    responses = [r for r in results if isinstance(r, dict)]
    for body in responses:
        assert (body["bundle"], body["profile"], body["version"]) in published
        allowed = {body["profile"]} if body["operating"] is None else {body["operating"]["a"], body["operating"]["b"]}
        assert {p["profile"] for p in body["predictions"]} <= allowed
