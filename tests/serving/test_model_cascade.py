"""Cascades across models: member checks, the exit sequence and its costs, served == offline, the API.

Two small synthetic members (a random ResNet-20 with its own normalisation, then a random ResNet-20), calibrated
on synthetic images: fast enough for CI, and every rule of the sequence is exercised (a member skipped when
none of its exits is enabled, hand-over at a member's classifier, re-normalisation between members).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.earlyexit.costs import ExitCosts
from service.earlyexit.decision_table import DecisionTable
from service.earlyexit.model_cascade import join_costs, join_tables, locate, member_offsets
from service.earlyexit.policy import class_means_policy
from service.offline.calibration import CalibrationConfig, HeadConfig
from service.offline.cascade_calibration import cascade_table
from service.offline.operations import calibrate_model, evaluate_model
from service.serving.runners import RunnerOptions, make_runner
from service.store.active import resolve_bundle
from service.store.cascade_dir import CascadeError, create_cascade
from service.store.model_dir import MODEL_FILE, load_model
from tests.api.conftest import AUTH, make_settings, make_zip, png_bytes, serve
from tests.factories import CLASSES, make_tiny_cascade_store, make_tiny_model, synthetic_images

SMALL, BIG, CASCADE = "small", "big", "casc"


@pytest.fixture(scope="module")
def cascade_store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cascade-store")
    make_tiny_cascade_store(root, CASCADE)
    return root


@pytest.fixture()
def cascade_store(cascade_store_root, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(cascade_store_root, tmp_path / "store"))


# -- the sequence's arithmetic ---------------------------------------------------------------------------


def test_join_costs_shifts_members_and_skips_a_member_with_no_enabled_exit():
    a = ExitCosts((1.0, 3.0, 6.0), (0.5, 0.5))
    b = ExitCosts((10.0, 30.0), (2.0,))
    j = join_costs([a, b])
    assert j.backbone_cum == (1.0, 3.0, 6.0, 16.0, 36.0)
    assert j.head_cost == (0.5, 0.5, 0.0, 2.0)  # the hand-over at a's classifier costs nothing extra
    assert j.skips == ((0, 2, 6.0),) and j.full == 30.0  # everything off: the last member alone
    per = j.per_exit(torch.tensor([[1.0, 1.0, 1.0, 1.0],  # a skipped: b alone
                                   [1.0, 1.0, 0.5, 1.0],  # a runs to its classifier, no head consulted
                                   [0.2, 1.0, 1.0, 0.3]]))  # a's first head, b's head
    assert per[0, 3:].tolist() == [10.0, 30.0]
    assert per[1].tolist() == [1.0, 3.0, 6.0, 16.0, 36.0]
    assert per[2].tolist() == [1.5, 3.5, 6.5, 18.5, 38.5]
    assert member_offsets([3, 2]) == [0, 3] and locate([3, 2], 4) == (1, 1) and locate([3, 2], 2) == (0, 2)


def test_join_tables_concatenates_columns_and_refuses_other_samples():
    labels = torch.tensor([0, 1])
    t1 = DecisionTable(torch.tensor([[0.9, 0.8], [0.2, 0.6]]), torch.tensor([[0, 0], [1, 1]]), labels)
    t2 = DecisionTable(torch.tensor([[0.5, 1.0], [0.7, 0.9]]), torch.tensor([[0, 0], [0, 1]]), labels)
    j = join_tables([t1, t2])
    assert j.num_exits == 4 and j.pred[1].tolist() == [1, 1, 0, 1]
    # threshold at the hand-over (a's classifier, column 1) 0.7: row 0 (0.8) leaves there, row 1 goes on
    assert j.exit_indices(torch.tensor([[1.0, 0.7, 1.0]]))[0].tolist() == [1, 3]
    with pytest.raises(ValueError, match="same samples"):
        join_tables([t1, DecisionTable(t2.top_prob, t2.pred, torch.tensor([1, 0]))])


# -- member checks -----------------------------------------------------------------------------------------


def test_member_checks_name_the_first_difference(tmp_path):
    make_tiny_model(tmp_path / "a")
    make_tiny_model(tmp_path / "b", seed=1)
    spec = json.loads((tmp_path / "b" / MODEL_FILE).read_text())
    spec["classes"][3] = "kitten"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / MODEL_FILE).write_text(json.dumps({**spec, "name": "c"}))
    with pytest.raises(CascadeError, match="class 3 is 'cat' in a but 'kitten' in c") as e:
        create_cascade(tmp_path, "x", ["a", "c"])
    assert e.value.code == "cascade_class_mismatch" and e.value.status == 422
    spec = json.loads((tmp_path / "b" / MODEL_FILE).read_text())
    spec["input"]["size"] = [64, 64]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MODEL_FILE).write_text(json.dumps({**spec, "name": "d"}))
    with pytest.raises(CascadeError, match="same image") as e:
        create_cascade(tmp_path, "x", ["a", "d"])
    assert e.value.code == "cascade_input_mismatch"
    with pytest.raises(CascadeError) as e:
        create_cascade(tmp_path, "x", ["a", "nope"])
    assert e.value.code == "model_not_found" and e.value.status == 404
    with pytest.raises(CascadeError, match="twice"):
        create_cascade(tmp_path, "x", ["a", "a"])
    create_cascade(tmp_path, "x", ["a", "b"])
    with pytest.raises(CascadeError) as e:
        create_cascade(tmp_path, "x", ["a", "b"])
    assert e.value.code == "model_exists" and e.value.status == 409
    with pytest.raises(CascadeError, match="itself a cascade"):
        create_cascade(tmp_path, "y", ["x", "a"])
    assert not (tmp_path / "y").exists()


def test_a_changed_member_is_refused_at_load(cascade_store):
    from service.store.model_dir import ModelDirError

    make_tiny_model(cascade_store / BIG, seed=7)  # other weights
    with pytest.raises(ModelDirError, match="member weights changed since it was made"):
        load_model(cascade_store / CASCADE)


# -- calibration and serving -----------------------------------------------------------------------------


def test_cascade_bundle_is_a_sequence_of_both_members(cascade_store_root):
    spec, net = load_model(cascade_store_root / CASCADE)
    bundle = resolve_bundle(cascade_store_root / CASCADE, spec, net.num_exits, None)
    assert net.num_exits == 11 + 11 and bundle.exit_names[10] == f"{SMALL}/head"
    assert bundle.exit_names[11] == f"{BIG}/stem"
    assert len(bundle.costs.skips) == 1 and bundle.costs.skips[0][:2] == (0, 10)
    assert bundle.costs.full == pytest.approx(bundle.costs.backbone_cum[-1] - bundle.costs.skips[0][2])
    full = bundle.profile("full")
    assert full.flops == pytest.approx(bundle.costs.full) and full.flops_fraction == 1.0
    assert all(p.flops <= bundle.costs.full + 1e-6 for p in bundle.profiles)
    report = json.loads((cascade_store_root / CASCADE / "bundles" / bundle.bundle_id / "report.json").read_text())
    assert [m["name"] for m in report["members"]] == [SMALL, BIG]


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_served_equals_offline_for_every_profile_batch_one_and_mixed(cascade_store_root, engine):
    spec, net = load_model(cascade_store_root / CASCADE)
    bundle = resolve_bundle(cascade_store_root / CASCADE, spec, net.num_exits, None)
    data = synthetic_images(96, seed=11)
    table = cascade_table(net, bundle, data)
    policies = {p.name: class_means_policy(p.name, p.thresholds, bundle.costs) for p in bundle.profiles}
    runner, info = make_runner(RunnerOptions(engine=engine), net, bundle.heads, None, list(policies.values()), [])
    assert info["engine"] == engine and set(info["members"]) == {SMALL, BIG}
    x = net.members[0].normalizer(data.images)
    handed_over = 0
    for p in bundle.profiles:
        t = torch.tensor(p.thresholds, dtype=torch.float32).view(1, -1)
        ex = table.exit_indices(t)[0]
        res = runner.run(x, policies[p.name])
        assert res.exit_index.tolist() == ex.tolist(), p.name
        assert res.pred.tolist() == table.pred.gather(1, ex.view(-1, 1)).flatten().tolist(), p.name
        assert torch.allclose(res.flops, bundle.costs.per_exit(t)[0][ex]), p.name
        one = runner.run(x[:1], policies[p.name])
        assert one.exit_index.item() == ex[0].item() and one.pred.item() == res.pred[0].item()
        handed_over += int((ex >= net.offsets[1]).sum())
    full = runner.run(x, policies["full"])  # every exit off: the small member is not run at all
    assert (full.exit_index == net.num_exits - 1).all()
    assert torch.allclose(full.flops, torch.full_like(full.flops, bundle.costs.full))
    names = list(policies)
    rows = [policies[names[i % len(names)]] for i in range(len(data))]
    mixed = runner.run(x, rows)
    for i in range(len(data)):
        t = torch.tensor(bundle.profile(rows[i].name).thresholds, dtype=torch.float32).view(1, -1)
        assert mixed.exit_index[i].item() == table.exit_indices(t)[0][i].item()
    assert handed_over > 0


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_the_batch_one_path_answers_each_row_as_the_general_path_does(cascade_store_root, engine):
    """One row by the fast path and by the general one: the same exit, prediction, confidence, probabilities,
    FLOPs and rule, bit for bit, for every profile (against the whole batch the scores may differ in the last
    bits: another batch size runs other kernels; the served-equals-offline test covers decisions)."""
    spec, net = load_model(cascade_store_root / CASCADE)
    bundle = resolve_bundle(cascade_store_root / CASCADE, spec, net.num_exits, None)
    data = synthetic_images(48, seed=5)
    policies = [class_means_policy(p.name, p.thresholds, bundle.costs) for p in bundle.profiles]
    runner, _ = make_runner(RunnerOptions(engine=engine), net, bundle.heads, None, policies, [])
    x = net.members[0].normalizer(data.images)
    for policy in policies:
        for i in range(len(data)):
            one = runner.run(x[i:i + 1], policy)
            general = runner._run_rows(x[i:i + 1], [runner.split(policy)], None)
            for name in ("exit_index", "pred", "confidence", "probs", "flops", "rule"):
                got, want = getattr(one, name), getattr(general, name)
                assert got.dtype == want.dtype and got.shape == want.shape, (policy.name, name)
                assert torch.equal(got, want), (policy.name, i, name)


def test_evaluate_and_recalibrate_from_the_cli_operations(cascade_store):
    report, png = evaluate_model(cascade_store / CASCADE, synthetic_images(80, seed=4))
    assert report["per_exit"][10]["name"] == f"{SMALL}/head" and png[:4] == b"\x89PNG"
    ids, summary = calibrate_model(cascade_store / CASCADE, synthetic_images(200, seed=2),
                                   CalibrationConfig(heads=[HeadConfig("pool4")], search="quantile", samples=200),
                                   holdout=60, source="synthetic.npz")
    assert len(ids) == 1 and set(summary["members"]) == {SMALL, BIG}
    assert summary["estimate"]["overlaps_training"] is None  # the random members record no training data


# -- over HTTP -------------------------------------------------------------------------------------------


def _members_zip(per_class: int) -> bytes:
    data = synthetic_images(per_class * len(CLASSES), seed=9)
    counters: dict[int, int] = {}
    members = {}
    for im, y in zip(data.images, data.labels, strict=True):
        i = counters.get(int(y), 0)
        counters[int(y)] = i + 1
        members[f"{CLASSES[int(y)]}/{i:03d}.png"] = png_bytes(im)
    return make_zip(members)


async def test_classify_names_the_member_and_recompute_refreshes_every_member(cascade_store):
    from tests.api.test_admin import wait_job

    async with serve(make_settings(cascade_store, model=CASCADE)) as s:
        img = png_bytes(synthetic_images(1, seed=3).images[0])
        r = await s.client.post("/classify", content=img, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        assert p["member"] in (SMALL, BIG) and p["exit_name"].startswith(p["member"] + "/")
        assert p["num_exits"] == 22
        r = await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)
        assert r.status_code == 200, r.text
        r = await s.client.post("/classify", content=img, headers={"content-type": "image/png"})
        p = r.json()["predictions"][0]
        assert p["member"] == BIG and p["flops_fraction"] == pytest.approx(1.0)
        metrics = (await s.client.get("/metrics")).text
        assert f'classmeans_member_samples_total{{member="{BIG}",model="{CASCADE}"}}' in metrics
        old = s.state.engine.snapshot.bundle
        r = await s.client.post("/admin/class-means", content=_members_zip(20), params={"samples": 200},
                                headers={**AUTH, "content-type": "application/zip"})
        assert r.status_code == 202, r.text
        job = await wait_job(s.client, r.json()["id"])
        assert job["state"] == "succeeded", job
        new = s.state.engine.snapshot.bundle
        assert new.bundle_id == job["result"]["bundle"] != old.bundle_id
        for j in (1, 12):  # an exit of each member: new means
            assert not torch.equal(new.heads[j].means, old.heads[j].means)
        r = await s.client.post("/classify", content=img, headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["bundle"] == new.bundle_id


async def test_admin_creates_cascades_with_clear_errors(cascade_store):
    async with serve(make_settings(cascade_store, model=CASCADE)) as s:
        body = {"name": "casc2", "members": [BIG, SMALL]}
        r = await s.client.post("/admin/cascades", json=body)
        assert r.status_code == 401
        r = await s.client.post("/admin/cascades", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["members"] == [BIG, SMALL] and (cascade_store / "casc2" / MODEL_FILE).is_file()
        r = await s.client.post("/admin/cascades", json=body, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_exists"
        r = await s.client.post("/admin/cascades", json={"name": "c3", "members": [BIG, "nope"]}, headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await s.client.post("/admin/cascades", json={"name": "c3", "members": [BIG]}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        assert not (cascade_store / "c3").exists()


@pytest.mark.parametrize("engine_name", ["torch", "onnx"])
def test_time_axis_of_a_cascade_joins_the_members_like_flops(cascade_store_root, engine_name):
    from service.offline.timing import timing_document
    from service.serving.time_measure import serving_time_tables

    spec, net = load_model(cascade_store_root / CASCADE)
    bundle = resolve_bundle(cascade_store_root / CASCADE, spec, net.num_exits, None)
    runner, _ = make_runner(RunnerOptions(engine=engine_name), net, bundle.heads, None, [], [])
    tables, engine = serving_time_tables(runner, net, bundle.heads, (3, 32, 32), (1, 4), repeats=5)
    assert engine == engine_name and set(tables) == {1, 4}
    t1 = tables[1]
    assert t1.num_exits == net.num_exits
    assert t1.full_ms == pytest.approx(t1.members[1].full_ms)  # every exit off: the last member alone
    costs = t1.exit_costs()
    assert costs.backbone_cum[11] == pytest.approx(t1.members[0].full_ms + t1.members[1].exit_costs().backbone_cum[0])
    doc = timing_document(bundle, cascade_table(net, bundle, synthetic_images(60, seed=8)), tables, engine, 1,
                          {"source": "synthetic", "samples": 60})
    assert doc["profiles"]["full"]["time_fraction"]["1"] == pytest.approx(1.0, abs=1e-5)
    assert doc["tables"]["1"]["members"][0]["batch_size"] == 1
    assert all(p["ms"]["1"] > 0 for p in doc["profiles"].values())


async def test_profiles_list_each_member_alone_beside_the_cascade(cascade_store):
    async with serve(make_settings(cascade_store, model=CASCADE)) as s:
        body = (await s.client.get("/profiles")).json()
        assert [m["name"] for m in body["members"]] == [SMALL, BIG]
        big = body["members"][1]["curve"]
        assert max(f for f, _ in big) == pytest.approx(1.0)  # the last member alone is the reference
        assert all(f > 0 for m in body["members"] for f, _ in m["curve"])


async def test_the_autopilot_steers_a_cascade(cascade_store):
    async with serve(make_settings(cascade_store, model=CASCADE)) as s:
        r = await s.client.post("/profiles", json={"latency_slo_ms": 5000}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = (await s.client.get("/profiles")).json()
        assert body["autopilot"]["enabled"] is True and body["autopilot"]["latency_slo_ms"] == 5000
        img = png_bytes(synthetic_images(1, seed=5).images[0])
        r = await s.client.post("/classify", content=img, headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["predictions"][0]["member"] in (SMALL, BIG)
        r = await s.client.post("/profiles", json={"name": "full"}, headers=AUTH)
        assert r.status_code == 200 and (await s.client.get("/profiles")).json()["autopilot"]["enabled"] is False


def test_exports_from_several_threads_do_not_collide():
    """The background builders of a cascade's members export at once; torch's exporter keeps global state."""
    import threading

    from service.serving.compiled.export import export_bytes

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(3):
                assert export_bytes(module, (3, 8, 8), ["y"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
