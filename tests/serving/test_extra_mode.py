"""A decision mode that exists only in this test: registered in the decision-mode table
(:mod:`service.earlyexit.modes`) and nowhere else, it runs through the policy, the cascade runner (batched,
batch 1, mixed with a built-in mode) and the offline table and search, which agree exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.backbones import profile_stages
from service.backbones.internal_classifiers import ICSet, place_ics
from service.backbones.preprocess import Normalizer
from service.earlyexit.cascade_search import search_mode
from service.earlyexit.ic_rules import RULE_NAMES, from_score_thresholds, to_score_thresholds
from service.earlyexit.modes import CM_HEAD, CM_SLOT, IC_NEGENT_SLOT, DecisionMode, get_mode, mode_names, registered
from service.earlyexit.policy import ic_policy
from service.offline.ic_cache import extract_cache
from service.offline.ic_operation import search_profiles
from service.offline.ics import ic_table_from_cache
from service.serving.cascade import CascadeRunner
from service.store.bundle_model import load_bundle
from service.store.bundles import read_active
from service.store.ic_sets import ic_costs
from service.store.model_dir import load_model
from tests.factories import synthetic_images

# Class means OR a confident (low-entropy) IC, predicting with the class means: a rule no built-in mode has.
EXTRA = DecisionMode("cm_or_entropy", (CM_SLOT, IC_NEGENT_SLOT), CM_HEAD, keys=("cm", "entropy"))


@pytest.fixture(scope="module")
def setup(tiny_store_root):
    model_dir = tiny_store_root / "tiny"
    spec, net = load_model(model_dir)
    bundle = load_bundle(model_dir, read_active(model_dir)["bundle"], spec, net.num_exits)
    prof = profile_stages(net)
    exits = place_ics(prof).exits
    ics = ICSet(exits, [prof.shapes[e] for e in exits], len(spec.classes), seed=3).eval()
    data = synthetic_images(48, seed=11)
    norm = Normalizer(spec.mean, spec.std)
    cache = extract_cache(net, data.images, data.labels, norm, exits, cm_heads=bundle.heads)
    table = ic_table_from_cache(ics, cache)
    costs = ic_costs(prof, ics, bundle.heads)
    return net, bundle, ics, table, costs, norm(data.images)


def test_a_mode_registered_in_the_table_runs_everywhere(setup):
    net, bundle, ics, table, costs, x = setup
    assert EXTRA.name not in mode_names()
    e = len(ics)
    with registered(EXTRA):
        assert get_mode(EXTRA.name) is EXTRA and EXTRA.needs_cm and EXTRA.heads == ("cm", "ic")
        rng = np.random.default_rng(0)
        cm_q = table.cm_prob.quantile(0.5, dim=0)
        ent_q = table.ic_entropy[:, :e].quantile(0.3, dim=0)
        cands = []
        for k in range(4):
            t = torch.stack([cm_q * float(rng.uniform(0.9, 1.1)), ent_q * float(rng.uniform(0.9, 1.1))])
            if k:  # some exits off in one criterion or both
                t[0, torch.from_numpy(rng.random(e) < 0.3)] = 1.0
                t[1, torch.from_numpy(rng.random(e) < 0.3)] = 0.0
            cands.append(t.float())
        to_backbone = [*ics.exits, net.num_exits - 1]
        runner = CascadeRunner(net, bundle.heads, ics)
        seen = set()
        for i, t in enumerate(cands):
            assert torch.equal(from_score_thresholds(EXTRA.name, to_score_thresholds(EXTRA.name, t))[0], t)
            policy = ic_policy(f"x{i}", EXTRA.name, t, ics.exits, costs, bundle.costs.backbone_cum)
            off = table.decide(EXTRA.name, t, costs)
            got = runner.run(x, policy)
            assert got.exit_index.tolist() == [to_backbone[int(j)] for j in off["exit"]]
            assert torch.equal(got.pred, off["pred"]) and torch.equal(got.rule, off["rule"])
            assert torch.allclose(got.flops, off["flops"])
            singles = [runner.run(x[r:r + 1], policy) for r in range(x.shape[0])]
            for field in ("exit_index", "pred", "flops", "rule"):
                assert torch.equal(torch.cat([getattr(s, field) for s in singles]), getattr(got, field)), field
            other = ic_policy("p", "ic_prob", torch.full((e,), 0.5), ics.exits, costs, bundle.costs.backbone_cum)
            mixed = runner.run(x, [policy if r % 2 else other for r in range(x.shape[0])])
            for field in ("exit_index", "pred", "flops", "rule"):
                assert torch.equal(getattr(mixed, field)[1::2], getattr(got, field)[1::2]), field
            seen.update(RULE_NAMES[int(r)] for r in got.rule)
        assert {"cm", "ic"} <= seen  # both criteria fired somewhere
        # The offline search and the stored form: a profile searched in the mode serves as searched.
        found = search_mode(table, costs, EXTRA.name, samples=200, seed=0, refine_rounds=1)
        assert found.thresholds.shape[1:] == (2, e)
        profiles = search_profiles(table, costs, modes=[EXTRA.name], samples=200, seed=0, refine_rounds=1)
        p = profiles[EXTRA.name][-1]
        assert set(p["thresholds"]) == {"cm", "entropy"}
        t = EXTRA.thresholds_tensor(p["thresholds"])
        f, a = table.evaluate(EXTRA.name, t.unsqueeze(0), costs)
        got = runner.run(x, ic_policy(p["name"], EXTRA.name, t, ics.exits, costs, bundle.costs.backbone_cum))
        assert abs(float(f) - p["flops"]) < 1e-6 * costs.full and abs(float(a) - p["accuracy"]) < 1e-12
        assert abs(got.flops.mean().item() - p["flops"]) < 1e-6 * costs.full
    assert EXTRA.name not in mode_names()
    with pytest.raises(ValueError, match="unknown decision mode"):
        get_mode(EXTRA.name)
