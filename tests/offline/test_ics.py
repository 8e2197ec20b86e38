"""Internal classifiers on a frozen backbone: module, placement, training, store, runner, baselines, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.baselines import (
    BRANCH_GRID,
    BranchSet,
    branch_costs,
    branch_table,
    bwds_cascade_costs,
    bwds_costs,
    bwds_tables,
    new_bwds,
    place_branches,
    train_branches,
    train_bwds_classifiers,
    train_bwds_policies,
)
from service.backbones import profile_stages
from service.backbones.internal_classifiers import ICSet, InternalClassifier, place_ics, pool_pair
from service.backbones.preprocess import Normalizer
from service.cli.main import main
from service.earlyexit.ic_rules import MODES, RULE_NAMES
from service.earlyexit.policy import ic_policy
from service.offline.evaluation import decision_table_for
from service.offline.ic_operation import search_profiles
from service.offline.ics import (
    ICTrainConfig,
    extract_cache,
    ic_table_from_cache,
    train_ics,
)
from service.serving.cascade import CascadeRunner
from service.store.bundle_model import load_bundle
from service.store.bundles import read_active
from service.store.ic_sets import ICError, ic_costs, load_ics, save_ics
from service.store.model_dir import load_model
from tests.factories import make_tiny_model, synthetic_images


def test_ic_module_pooling_and_flops():
    torch.manual_seed(0)
    ic = InternalClassifier((16, 32, 32), 10)
    x = torch.randn(3, 16, 32, 32)
    assert ic.kernel == 8 and ic.feature_dim == 16 * 16
    assert torch.allclose(ic(x), ic.forward_pooled(*pool_pair(x, 8)))
    manual = ic.alpha * torch.nn.functional.max_pool2d(x, 8) + (1 - ic.alpha) * torch.nn.functional.avg_pool2d(x, 8)
    assert torch.allclose(ic(x), ic.linear(manual.flatten(1)), atol=1e-6)
    # Linear 2*D*K (FlopCounterMode) + max compare and avg add per input element + the mix (3 per output).
    assert ic.flops() == 2 * 256 * 10 + 2 * 16 * 32 * 32 + 3 * 256
    small = InternalClassifier((64, 4, 4), 10)
    assert small.kernel == 1 and small.flops() == 2 * 1024 * 10  # no pooling at 4x4
    assert 0.0 <= float(ic.alpha.detach()) < 1.0 and ic.alpha.requires_grad  # learnable, U[0, 1) like SDN


def test_placement_on_resnet20_and_resnet56():
    from service.backbones import build_backbone

    net = build_backbone({"family": "cifar_resnet", "depth": 20}, 10)
    prof = profile_stages(net)
    p = place_ics(prof)
    assert p.exits == (1, 2, 4, 5, 7, 8)
    assert all(abs(f - t) < 0.07 for f, t in zip(p.fractions, p.targets, strict=True))
    net56 = build_backbone({"family": "cifar_resnet", "depth": 56}, 10)
    p56 = place_ics(profile_stages(net56))
    assert len(set(p56.exits)) == 6 and all(abs(f - t) < 0.03 for f, t in zip(p56.fractions, p56.targets,
                                                                               strict=True))
    assert place_branches(prof) == (0, 3)


@pytest.fixture(scope="module")
def tiny(tiny_store_root):
    """The session's tiny store (a random ResNet-20 with a calibrated pool4 bundle; read only here), and
    synthetic data split 160 / 60."""
    model_dir = tiny_store_root / "tiny"
    spec, net = load_model(model_dir)
    bundle = load_bundle(model_dir, read_active(model_dir)["bundle"], spec, net.num_exits)
    data = synthetic_images(220, seed=7)
    train, sel = data.split_holdout(60, seed=0)
    return model_dir, spec, net, bundle, train, sel


def _bn_state(net):
    return {k: v.clone() for k, v in net.module.state_dict().items()}


@pytest.mark.parametrize("source", ["online", "cached"])
def test_training_leaves_the_backbone_untouched(tiny, source):
    _, spec, net, _, train, _ = tiny
    prof = profile_stages(net)
    before = _bn_state(net)
    flags = [p.requires_grad for p in net.module.parameters()]
    net.module.train()  # even if the caller left it in train mode, BN must not update
    cfg = ICTrainConfig(epochs=1, batch_size=64, source=source)
    res = train_ics(net, prof, train, Normalizer(spec.mean, spec.std), cfg)
    after = net.module.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # running_mean / running_var / num_batches_tracked / weights
    assert any("running_mean" in k for k in before)
    assert [p.requires_grad for p in net.module.parameters()] == flags  # restored
    assert net.module.training  # restored too
    net.module.eval()
    fresh = ICSet(res.ics.exits, [ic.in_shape for ic in res.ics.ics], 10, seed=0)
    assert not torch.equal(fresh.ics[0].linear.weight, res.ics.ics[0].linear.weight)  # the ICs did learn
    assert all(0.0 <= float(ic.alpha.detach()) <= 1.0 for ic in res.ics.ics)
    assert len(res.history) == 1 and res.history[0]["seconds"] > 0


def test_cached_training_is_seeded_and_snapshots_match_shorter_runs(tiny):
    _, spec, net, _, train, _ = tiny
    prof = profile_stages(net)
    norm = Normalizer(spec.mean, spec.std)
    cache = extract_cache(net, train.images, train.labels, norm, place_ics(prof).exits, dtype=np.float16)
    a = train_ics(net, prof, train, norm, ICTrainConfig(epochs=2, batch_size=64, snapshot_epochs=(1,)), cache=cache)
    b = train_ics(net, prof, train, norm, ICTrainConfig(epochs=1, batch_size=64), cache=cache)
    for x, y in zip(a.snapshots[1].state_dict().values(), b.ics.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_store_round_trip_and_validation(tiny, tiny_store):
    _, spec, net, _, train, _ = tiny
    model_dir = tiny_store / "tiny"  # a private copy: this test writes into it
    prof = profile_stages(net)
    res = train_ics(net, prof, train, Normalizer(spec.mean, spec.std), ICTrainConfig(epochs=1, batch_size=64))
    ics_id, path = save_ics(model_dir, spec, res.ics, prof, {"note": "test"})
    assert (path / "ics.safetensors").is_file() and (path / "ics.json").is_file()
    loaded, meta, profiles = load_ics(model_dir, spec, prof, ics_id)
    assert profiles is None and meta["weights_sha256"] == spec.weights_sha256
    for x, y in zip(loaded.state_dict().values(), res.ics.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    # Another backbone's weights, a tampered tensor file, a wrong shape: refused with a reason.
    other = spec.__class__(**{**spec.__dict__, "weights_sha256": "0" * 64})
    with pytest.raises(ICError, match="other weights"):
        load_ics(model_dir, other, prof, ics_id)
    blob = bytearray((path / "ics.safetensors").read_bytes())
    blob[-1] ^= 1
    (path / "ics.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ICError, match="checksum"):
        load_ics(model_dir, spec, prof, ics_id)
    ics_id2, path2 = save_ics(model_dir, spec, res.ics, prof, {})
    meta2 = json.loads((path2 / "ics.json").read_text())
    meta2["ics"][0]["in_shape"] = [32, 16, 16]
    (path2 / "ics.json").write_text(json.dumps(meta2))
    with pytest.raises(ICError, match="backbone gives"):
        load_ics(model_dir, spec, prof, ics_id2)
    with pytest.raises(ICError):
        load_ics(model_dir, spec, prof, "../etc")


def test_runner_equals_offline_table_in_every_mode(tiny):
    _, spec, net, bundle, train, sel = tiny
    prof = profile_stages(net)
    norm = Normalizer(spec.mean, spec.std)
    res = train_ics(net, prof, train, norm, ICTrainConfig(epochs=2, batch_size=64))
    cache = extract_cache(net, sel.images, sel.labels, norm, res.ics.exits, cm_heads=bundle.heads)
    table = ic_table_from_cache(res.ics, cache)
    # The cache's class-means columns are the bundle's own decision table (every exit).
    ref = decision_table_for(net, bundle, sel, norm)
    assert torch.allclose(torch.from_numpy(cache.cm_all_top), ref.top_prob[:, :-1], atol=1e-6)
    assert torch.equal(torch.from_numpy(cache.cm_all_pred), ref.pred[:, :-1])
    assert torch.equal(table.cm_pred, ref.pred[:, list(res.ics.exits)])
    costs = ic_costs(prof, res.ics, bundle.heads)
    assert costs.ic_cost == tuple(float(f) for f in res.ics.flops()) and all(c > 0 for c in costs.cm_cost)
    profiles = search_profiles(table, costs, samples=300, seed=0, refine_rounds=1)
    assert set(profiles) == set(MODES)
    runner = CascadeRunner(net, bundle.heads, res.ics)
    exits = [*res.ics.exits, net.num_exits - 1]  # IC exit i -> backbone exit

    def policy(mode, t, name="p"):
        return ic_policy(name, mode, t, res.ics.exits, costs, bundle.costs.backbone_cum)

    x = norm(sel.images)
    n = len(sel)
    rng = np.random.default_rng(0)
    checked_rules = set()
    for mode, plist in profiles.items():
        cands = [p["thresholds"] for p in plist[:2]]
        e = len(res.ics)
        for _ in range(2):  # plus random thresholds, some exits off
            r = rng.uniform(0.1, 0.9, size=e) if mode != "ic_entropy" else rng.uniform(0.0, 2.0, size=e)
            r[rng.random(e) < 0.3] = 0.0 if mode == "ic_entropy" else 1.0
            cands.append({"ic": r.tolist(), "cm": rng.uniform(0.1, 1.0, size=e).tolist()} if mode == "combined"
                         else r.tolist())
        for c_i, thr in enumerate(cands):
            t = torch.tensor([thr["ic"], thr["cm"]]) if isinstance(thr, dict) else torch.tensor(thr)
            off = table.decide(mode, t, costs)
            got = runner.run(x, policy(mode, t))
            assert got.exit_index.tolist() == [exits[int(e)] for e in off["exit"]], mode
            assert torch.equal(got.pred, off["pred"]), mode
            assert torch.equal(got.rule, off["rule"]), mode
            assert torch.allclose(got.flops, off["flops"]), mode
            checked_rules.update(RULE_NAMES[int(r)] for r in got.rule)
            # One row at a time (the batch-1 path) decides exactly as the batch does; its scores differ
            # from the batch's only by the backbone's float rounding at another batch size.
            single = [runner.run(x[i:i + 1], policy(mode, t)) for i in range(c_i % 7, n, 7)]
            sub = slice(c_i % 7, n, 7)
            for field in ("exit_index", "pred", "flops", "rule"):
                assert torch.equal(torch.cat([getattr(s, field) for s in single]), getattr(got, field)[sub]), \
                    (mode, c_i, field)
            for field in ("confidence", "probs"):
                assert torch.allclose(torch.cat([getattr(s, field) for s in single]), getattr(got, field)[sub],
                                      atol=1e-5), (mode, c_i, field)
    assert {"ic", "cm", "final"} <= checked_rules
    # Rows of one batch may carry different modes.
    modes = [MODES[i % len(MODES)] for i in range(len(sel))]
    by_mode = {}
    for m in MODES:
        p = profiles[m][0]["thresholds"]
        by_mode[m] = policy(m, torch.tensor([p["ic"], p["cm"]]) if isinstance(p, dict) else torch.tensor(p), m)
    mixed = runner.run(x, [by_mode[m] for m in modes])
    for m in MODES:
        idx = [i for i, mm in enumerate(modes) if mm == m]
        alone = runner.run(x[idx], by_mode[m])
        for field in ("exit_index", "pred", "flops", "rule"):
            assert torch.equal(getattr(mixed, field)[idx], getattr(alone, field)), (m, field)
    full = runner.run(x, policy("ic_prob", torch.ones(len(res.ics))))
    assert torch.allclose(full.flops, torch.full((len(sel),), costs.full, dtype=torch.float64))
    with torch.inference_mode():
        assert torch.equal(full.pred, net.module(x).argmax(1))
    assert full.rule_names()[0] == "final"


def test_branchynet_and_bwds_baselines(tiny):
    _, spec, net, _, train, sel = tiny
    prof = profile_stages(net)
    norm = Normalizer(spec.mean, spec.std)
    exits = place_ics(prof).exits
    bexits = place_branches(prof)
    tr = extract_cache(net, train.images, train.labels, norm, exits, map_exits=bexits, dtype=np.float16,
                       map_grid=BRANCH_GRID)
    se = extract_cache(net, sel.images, sel.labels, norm, exits, map_exits=bexits, map_grid=BRANCH_GRID)
    assert se.maps[0].shape == (len(sel), 16, 8, 8)
    branches = BranchSet(bexits, [prof.shapes[e] for e in bexits], 10)
    x = torch.randn(2, 16, 32, 32)
    b0 = branches.branches[0].eval()
    assert torch.allclose(b0(x), b0.forward_pooled(torch.nn.functional.max_pool2d(x, 4)))
    log = train_branches(branches, tr, ICTrainConfig(epochs=1, batch_size=64))
    assert len(log.history) == 1
    table = branch_table(branches, se)
    costs = branch_costs(prof, branches)
    # conv 3x3 16->32 at 8x8 + linear 32->10 + max-pool compares (16*32*32) + global-pool adds (32*8*8)
    assert costs.ic_cost[0] == 2 * 16 * 32 * 9 * 64 + 2 * 32 * 10 + 16 * 32 * 32 + 32 * 64
    f, a = table.evaluate("ic_entropy", torch.tensor([[2.3, 2.3]]), costs)  # everything exits at branch 1
    assert f.item() == costs.backbone_cum[0] + costs.ic_cost[0]
    assert a.item() == table.per_exit_accuracy()["ic"][0]
    model = new_bwds(prof, exits, 10)
    train_bwds_classifiers(model, tr, ICTrainConfig(epochs=1, batch_size=64))
    bcosts = bwds_costs(prof, model)
    plog = train_bwds_policies(model, tr, bcosts, lambdas=(0.1, 1.0))
    assert len(plog.history) == 2 * len(exits)
    tables = bwds_tables(model, se)
    cc = bwds_cascade_costs(bcosts)
    for tab in tables.values():
        f, _ = tab.evaluate(torch.full((1, 1, len(exits)), 0.0), cc)  # score > 0 always: exit 0
        assert f.item() == pytest.approx(bcosts.backbone_cum[0] + bcosts.ic_cost[0] + bcosts.cm_cost[0])
        f, _ = tab.evaluate(torch.ones(1, 1, len(exits)), cc)
        assert f.item() == bcosts.full


def test_cli_train_ics(tmp_path, capsys):
    model_dir = tmp_path / "store" / "tiny"
    make_tiny_model(model_dir)
    data = synthetic_images(200, seed=2)
    path = tmp_path / "d.npz"
    np.savez(path, images=data.images, labels=data.labels, classes=np.array(data.classes))
    assert main(["train-ics", "--model-dir", str(model_dir), "--data", str(path), "--epochs", "1",
                 "--holdout", "50", "--samples", "200", "--batch-size", "50"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bundle"] is None and set(summary["profiles"]) == {"ic_prob", "ic_entropy"}  # no class means
    assert summary["train_samples"] == 150 and summary["selection_samples"] == 50
    stored = json.loads((model_dir / "ics" / summary["ics_id"] / "profiles.json").read_text())
    assert all(p["mode"] == "ic_entropy" for p in stored["modes"]["ic_entropy"])
    assert main(["train-ics", "--model-dir", str(model_dir), "--data", str(path), "--epochs", "0"]) == 2
