"""The IC exit rules on hand-made tables with known answers, and the vectorised evaluation against a plain
per-sample reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.earlyexit.cascade_search import combined_seeds, max_entropy, search_mode
from service.earlyexit.ic_rules import (
    MODES,
    RULE_NAMES,
    ICCosts,
    ICDecisionTable,
    branchynet_fires,
    combined_fires,
    entropy,
    from_score_thresholds,
    sdn_fires,
    to_score_thresholds,
)


def test_entropy_and_single_rules():
    k = 10
    uniform = torch.full((1, k), 1.0 / k)
    onehot = torch.zeros(1, k)
    onehot[0, 3] = 1.0
    assert entropy(uniform).item() == pytest.approx(math.log(k), abs=1e-6)
    assert entropy(onehot).item() == 0.0
    assert max_entropy(k) == pytest.approx(math.log(k))
    top = torch.tensor([0.2, 0.5, 0.5000001, 1.0])
    assert sdn_fires(top, 0.5).tolist() == [False, False, True, True]  # strict
    assert not sdn_fires(top, 1.0).any() and not sdn_fires(top, 1.5).any()  # >= 1 disables, even p = 1
    ent = torch.tensor([0.0, 0.3, 0.29, 2.3])
    assert branchynet_fires(ent, 0.3).tolist() == [True, False, True, False]  # strict
    assert not branchynet_fires(ent, 0.0).any() and not branchynet_fires(ent, -1.0).any()  # <= 0 disables
    assert combined_fires(torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.9, 0.1]), 0.5, 0.5).tolist() == [
        True, True, False]
    assert not combined_fires(torch.tensor([1.0]), torch.tensor([1.0]), 1.0, 1.0).any()


def _hand_table() -> tuple[ICDecisionTable, ICCosts]:
    """4 samples, 2 IC exits + the network. Labels 0..3."""
    ic_prob = torch.tensor([[0.9, 0.5, 0.6],
                            [0.3, 0.8, 0.7],
                            [0.3, 0.4, 0.9],
                            [0.2, 0.3, 0.5]])
    ic_entropy = torch.tensor([[0.1, 1.0, 1.0],
                               [1.5, 0.2, 0.9],
                               [1.5, 1.2, 0.3],
                               [2.0, 1.9, 1.5]])
    ic_pred = torch.tensor([[0, 1, 0],
                            [5, 1, 1],
                            [6, 6, 2],
                            [7, 7, 3]])
    cm_prob = torch.tensor([[0.1, 0.1],
                            [0.1, 0.1],
                            [0.95, 0.1],  # class means are sure about sample 2 at exit 0...
                            [0.1, 0.1]])
    cm_pred = torch.tensor([[9, 9], [9, 9], [2, 9], [9, 9]])  # ... and right (label 2); the IC says 6
    labels = torch.tensor([0, 1, 2, 3])
    costs = ICCosts(backbone_cum=(100.0, 200.0, 1000.0), ic_cost=(10.0, 20.0), cm_cost=(1.0, 2.0))
    return ICDecisionTable(ic_prob, ic_entropy, ic_pred, labels, cm_prob, cm_pred), costs


def test_known_answers_for_every_mode():
    table, costs = _hand_table()
    # SDN, T = (0.85, 0.75): sample 0 leaves at 0, sample 1 at 1, 2 and 3 at the network.
    d = table.decide("ic_prob", torch.tensor([0.85, 0.75]), costs)
    assert d["exit"].tolist() == [0, 1, 2, 2]
    assert d["pred"].tolist() == [0, 1, 2, 3]
    assert d["flops"].tolist() == [110.0, 230.0, 1030.0, 1030.0]
    assert [RULE_NAMES[r] for r in d["rule"]] == ["ic", "ic", "final", "final"]
    f, a = table.evaluate("ic_prob", torch.tensor([[0.85, 0.75]]), costs)
    assert f.item() == pytest.approx((110 + 230 + 1030 + 1030) / 4) and a.item() == 1.0
    # BranchyNet, T = (0.5, 0.5) in nats: the same exits (entropies 0.1 and 0.2 are below 0.5).
    d = table.decide("ic_entropy", torch.tensor([0.5, 0.5]), costs)
    assert d["exit"].tolist() == [0, 1, 2, 2]
    # An entropy threshold of 0 switches exit 0 off: nothing computed there, sample 0 goes on to exit 1.
    d = table.decide("ic_entropy", torch.tensor([0.0, 1.1]), costs)
    assert d["exit"].tolist() == [1, 1, 2, 2] and d["flops"].tolist() == [220.0, 220.0, 1020.0, 1020.0]
    # Class means only at the IC exits: sample 2 leaves at exit 0 with the nearest mean (2).
    d = table.decide("cm", torch.tensor([0.9, 1.0]), costs)
    assert d["exit"].tolist() == [2, 2, 0, 2] and d["pred"].tolist() == [0, 1, 2, 3]
    assert d["flops"].tolist() == [1001.0, 1001.0, 101.0, 1001.0]
    assert [RULE_NAMES[r] for r in d["rule"]] == ["final", "final", "cm", "final"]


def test_combined_exits_with_the_ic_prediction_and_pays_both_heads():
    table, costs = _hand_table()
    t = torch.tensor([[0.85, 0.75], [0.9, 1.0]])  # IC thresholds, class-means thresholds
    d = table.decide("combined", t, costs)
    # Sample 2: class means fire at exit 0 (0.95 > 0.9), the IC does not (0.3) -> it exits there with the
    # IC's prediction 6 (wrong), not the class means' 2.
    assert d["exit"].tolist() == [0, 1, 0, 2]
    assert d["pred"].tolist() == [0, 1, 6, 3]
    assert [RULE_NAMES[r] for r in d["rule"]] == ["ic", "ic", "cm", "final"]
    # Exit 0 consults IC (10) and class means (1); exit 1 only the IC (20): class means are off there.
    assert d["flops"].tolist() == [111.0, 231.0, 111.0, 1031.0]
    f, a = table.evaluate("combined", t.unsqueeze(0), costs)
    assert a.item() == 0.75 and f.item() == pytest.approx((111 + 231 + 111 + 1031) / 4)
    # IC off (1.0) but class means on at exit 0: the IC still predicts, so it is paid for.
    d = table.decide("combined", torch.tensor([[1.0, 1.0], [0.9, 1.0]]), costs)
    assert d["exit"].tolist() == [2, 2, 0, 2] and d["pred"][2].item() == 6
    assert d["flops"].tolist() == [1011.0, 1011.0, 111.0, 1011.0]
    # Both fire: reported as such.
    table.cm_prob[0, 0] = 0.99
    d = table.decide("combined", t, costs)
    assert RULE_NAMES[d["rule"][0]] == "ic+cm"


def test_disabled_thresholds_give_the_full_network_at_full_cost():
    table, costs = _hand_table()
    for mode in MODES:
        off = 0.0 if mode == "ic_entropy" else 1.0
        shape = (1, 2, 2) if mode == "combined" else (1, 2)
        f, a = table.evaluate(mode, torch.full(shape, off), costs)
        assert f.item() == costs.full and a.item() == 1.0
        big = torch.full(shape, -3.0 if mode == "ic_entropy" else 7.0)
        f2, _ = table.evaluate(mode, big, costs)
        assert f2.item() == costs.full


def test_sdn_fallback_takes_the_most_confident_consulted_output():
    table, costs = _hand_table()
    # Nothing fires; consulted ICs: both. Sample 3: IC probs 0.2, 0.3, final 0.5 -> the final (3, right).
    # Sample 0: 0.9 at exit 0 beats the final 0.6 -> pred 0 (right). Sample 2: final 0.9 -> 2.
    f, a = table.evaluate_sdn_fallback(torch.tensor([[0.99, 0.99]]), costs)
    assert a.item() == 1.0 and f.item() == 1030.0
    table.ic_prob[1, 0] = 0.95  # sample 1: IC 0 says 5 with 0.95 > final 0.7 -> wrong
    _, a = table.evaluate_sdn_fallback(torch.tensor([[0.99, 0.99]]), costs)
    assert a.item() == 0.75
    _, a = table.evaluate_sdn_fallback(torch.tensor([[1.0, 0.99]]), costs)  # IC 0 off: not consulted
    assert a.item() == 1.0


def _random_table(n: int, e: int, k: int = 10, seed: int = 0) -> tuple[ICDecisionTable, ICCosts]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e + 1, k, generator=g) * 3
    probs = torch.softmax(logits, 2)
    cm_logits = torch.randn(n, e, k, generator=g) * 2
    cm = torch.softmax(cm_logits, 2)
    # Coarse values create ties between samples and with thresholds.
    ic_top = (probs.max(2).values * 20).round() / 20
    table = ICDecisionTable(ic_top, (entropy(probs) * 10).round() / 10, probs.argmax(2),
                            torch.randint(0, k, (n,), generator=g), (cm.max(2).values * 20).round() / 20,
                            cm.argmax(2))
    costs = ICCosts(tuple(float(v) for v in torch.linspace(10, 100, e + 1)), tuple(float(i + 1) for i in range(e)),
                    tuple(0.5 * (i + 1) for i in range(e)))
    return table, costs


def _plain_reference(table: ICDecisionTable, costs: ICCosts, mode: str, t: torch.Tensor) -> tuple[float, float]:
    """One sample at a time, one exit at a time, straight from the rule's definition."""
    e = table.num_exits - 1
    total_f, total_c = 0.0, 0
    for s in range(table.num_samples):
        spent, pred = 0.0, None
        for j in range(e):
            if mode == "combined":
                t_ic, t_cm = float(t[0, j]), float(t[1, j])
                ic_on, cm_on = t_ic < 1, t_cm < 1
                if ic_on or cm_on:
                    spent += costs.ic_cost[j] + (costs.cm_cost[j] if cm_on else 0.0)
                fire = (ic_on and table.ic_prob[s, j] > t_ic) or (cm_on and table.cm_prob[s, j] > t_cm)
                p = table.ic_pred[s, j]
            elif mode == "cm":
                on = float(t[j]) < 1
                spent += costs.cm_cost[j] if on else 0.0
                fire, p = on and table.cm_prob[s, j] > float(t[j]), table.cm_pred[s, j]
            elif mode == "ic_prob":
                on = float(t[j]) < 1
                spent += costs.ic_cost[j] if on else 0.0
                fire, p = on and table.ic_prob[s, j] > float(t[j]), table.ic_pred[s, j]
            else:
                on = float(t[j]) > 0
                spent += costs.ic_cost[j] if on else 0.0
                fire, p = on and table.ic_entropy[s, j] < float(t[j]), table.ic_pred[s, j]
            if fire:
                pred = int(p)
                spent += costs.backbone_cum[j]
                break
        if pred is None:
            pred = int(table.ic_pred[s, e])
            spent += costs.backbone_cum[e]
        total_f += spent
        total_c += int(pred == int(table.labels[s]))
    return total_f / table.num_samples, total_c / table.num_samples


@pytest.mark.parametrize("mode", MODES)
def test_vectorised_equals_plain_reference(mode):
    table, costs = _random_table(150, 4, seed=1)
    rng = np.random.default_rng(2)
    s = 24
    if mode == "ic_entropy":
        t = rng.choice([0.0, 0.3, 0.5, 1.0, 1.7, 2.3, -1.0], size=(s, 4))
    else:
        t = rng.choice([0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0, 1.2], size=(s, 4))
    t = torch.tensor(t, dtype=torch.float32)
    if mode == "combined":
        t2 = torch.tensor(rng.choice([0.3, 0.5, 0.7, 0.9, 1.0], size=(s, 4)), dtype=torch.float32)
        t = torch.stack([t, t2], 1)
    f, a = table.evaluate(mode, t, costs)
    cas = table.cascade(mode)
    fd, ad = cas.evaluate_dense(to_score_thresholds(mode, t), costs.cascade(mode))
    assert torch.allclose(f, fd) and torch.equal(a, ad)
    for i in range(s):
        rf, ra = _plain_reference(table, costs, mode, t[i])
        assert f[i].item() == pytest.approx(rf) and a[i].item() == pytest.approx(ra), (mode, i)


def test_bitset_handles_more_samples_than_one_chunk():
    table, _ = _random_table(300, 3, seed=3)
    cas = table.cascade("combined")
    t = to_score_thresholds("combined", torch.rand(40, 2, 3, generator=torch.Generator().manual_seed(0)))
    c1, h1 = cas.exit_counts(t, sample_chunk=64)
    c2, h2 = cas.exit_counts(t)
    assert (c1 == c2).all() and (h1 == h2).all()
    ex = cas.exit_indices(t)
    assert (np.stack([np.bincount(r, minlength=4) for r in ex.numpy()]) == c2).all()


def test_threshold_conventions_round_trip():
    t = torch.rand(5, 3)
    assert torch.equal(from_score_thresholds("ic_entropy", to_score_thresholds("ic_entropy", t)), t)
    assert to_score_thresholds("ic_prob", t).shape == (5, 1, 3)
    assert to_score_thresholds("combined", torch.rand(2, 3)).shape == (1, 2, 3)
    with pytest.raises(ValueError):
        to_score_thresholds("combined", torch.rand(5, 3))
    with pytest.raises(ValueError):
        to_score_thresholds("nope", t)


def test_search_hulls_and_combined_contains_sdn():
    table, costs = _random_table(400, 5, seed=4)
    sdn = search_mode(table, costs, "ic_prob", samples=400, seed=0, refine_rounds=2)
    assert sdn.hull and sdn.flops[0].item() == costs.full  # row 0: the full network
    f = sdn.flops[sdn.hull].numpy()
    a = sdn.accuracy[sdn.hull].numpy()
    assert (np.diff(f) > 0).all() and (np.diff(a) > 0).all()
    ent = search_mode(table, costs, "ic_entropy", samples=400, seed=0, refine_rounds=1)
    on = ent.thresholds[ent.thresholds > 0]
    assert (on <= max_entropy(10) + 1e-6).all()  # quantiles of observed entropies, inside [0, log K]
    seeds = combined_seeds(sdn.thresholds[sdn.hull], None, 5)
    comb = search_mode(table, costs, "combined", samples=400, seed=0, refine_rounds=2, extra=seeds)
    cf, ca = comb.flops[comb.hull].numpy(), comb.accuracy[comb.hull].numpy()
    for fi, ai in zip(f, a, strict=True):  # every SDN vertex is matched or beaten by the combined hull
        assert np.interp(fi, cf, ca, left=-1) >= ai - 1e-12
