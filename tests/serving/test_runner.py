"""The cascade runner at class-means profiles: batched, the same samples one by one, and the offline
decision table agree exactly."""

from __future__ import annotations

import torch

from service.backbones.preprocess import Normalizer
from service.earlyexit.policy import class_means_policy
from service.offline.evaluation import decision_table_for
from service.serving.cascade import CascadeRunner
from service.store.bundle_model import load_bundle
from service.store.bundles import read_active
from service.store.model_dir import load_model
from tests.factories import synthetic_images


def _loaded(store):
    model_dir = store / "tiny"
    spec, net = load_model(model_dir)
    bundle = load_bundle(model_dir, read_active(model_dir)["bundle"], spec, net.num_exits)
    return spec, net, bundle


def test_batched_single_and_table_agree(tiny_store_root):
    spec, net, bundle = _loaded(tiny_store_root)
    data = synthetic_images(64, seed=5)
    norm = Normalizer(spec.mean, spec.std)
    runner = CascadeRunner(net, bundle.heads)
    table = decision_table_for(net, bundle, data, norm, batch_size=16)
    x = norm(data.images)
    for profile in bundle.profiles:
        t = torch.tensor(profile.thresholds)
        policy = class_means_policy(profile.name, t, bundle.costs)
        batched = runner.run(x, policy)
        singles = [runner.run(x[i:i + 1], policy) for i in range(len(data))]
        offline = table.exit_indices(t.view(1, -1))[0]
        assert torch.equal(batched.exit_index, offline), profile.name
        assert torch.equal(batched.exit_index, torch.cat([s.exit_index for s in singles]))
        assert torch.equal(batched.pred, torch.cat([s.pred for s in singles]))
        assert torch.equal(batched.flops, torch.cat([s.flops for s in singles]))
        last = bundle.num_exits - 1
        assert batched.rule_names() == ["final" if e == last else "cm" for e in offline.tolist()]
        rows = torch.arange(len(data))
        assert torch.equal(batched.pred, table.pred[rows, offline])
        expected_flops = bundle.costs.per_exit(t.view(1, -1))[0][offline]
        assert torch.allclose(batched.flops, expected_flops)
        assert torch.allclose(batched.confidence, table.top_prob[rows, offline], atol=1e-5)
        f, _a = table.evaluate(t.view(1, -1), bundle.costs)
        assert abs(f.item() - batched.flops.mean().item()) < 1e-6 * bundle.costs.full


def test_rows_may_carry_different_profiles(tiny_store_root):
    spec, net, bundle = _loaded(tiny_store_root)
    data = synthetic_images(20, seed=9)
    x = Normalizer(spec.mean, spec.std)(data.images)
    runner = CascadeRunner(net, bundle.heads)
    cheap = class_means_policy("cheap", bundle.profiles[0].thresholds, bundle.costs)
    full = class_means_policy("full", [1.0] * (bundle.num_exits - 1), bundle.costs)
    mixed = [cheap if i % 2 else full for i in range(20)]
    out = runner.run(x, mixed)
    assert (out.exit_index[0::2] == bundle.num_exits - 1).all()
    alone = runner.run(x[1::2], cheap)
    for field in ("exit_index", "pred", "flops", "rule"):
        assert torch.equal(getattr(out, field)[1::2], getattr(alone, field)), field
    full_out = runner.run(x, full)
    assert torch.allclose(full_out.flops, torch.full((20,), bundle.costs.full, dtype=torch.float64))
    with torch.inference_mode():
        logits = net.module(x)
    assert torch.equal(full_out.pred, logits.argmax(1))
