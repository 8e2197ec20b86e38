"""The early-exit math on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.earlyexit import (
    ClassStatsAccumulator,
    DecisionTable,
    ExitCosts,
    NormaliserAccumulator,
    Profile,
    TimeSharingRouter,
    class_probabilities,
    euclidean_distances,
    fit_exit_head,
    search_thresholds,
    select_by_target,
    upper_hull,
)
from service.earlyexit.accumulators import CalibrationError
from service.earlyexit.hull import TargetUnreachable
from service.earlyexit.probabilities import exits_here
from service.earlyexit.reduction import reduce_feature, reduced_dim
from tests.numerics import EPS32, assert_within, dist_atol, softmax_atol, sum_atol


def blobs(n_per_class=400, k=4, d=6, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    x = centres.repeat_interleave(n_per_class, 0) + spread * torch.randn(k * n_per_class, d, generator=g)
    y = torch.arange(k).repeat_interleave(n_per_class)
    return x, y, centres


def test_class_means_are_the_blob_centres_and_merge_equals_whole():
    x, y, centres = blobs()
    whole = ClassStatsAccumulator(4, 6)
    whole.update(x, y)
    parts = [ClassStatsAccumulator(4, 6) for _ in range(3)]
    for i, chunk in enumerate(torch.arange(len(y)).chunk(3)):
        parts[i].update(x[chunk], y[chunk])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.allclose(whole.means(), merged.means(), atol=1e-10)
    assert torch.allclose(whole.means().float(), centres, atol=0.05)
    exact = torch.stack([x[y == k].double().mean(0) for k in range(4)])
    assert torch.allclose(whole.means(), exact, atol=1e-5)


def test_empty_class_and_non_finite_features_name_exit_and_class():
    acc = ClassStatsAccumulator(3, 2, exit_name="layer1.0")
    acc.update(torch.ones(4, 2), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(CalibrationError, match=r"layer1\.0.*cat"):
        acc.check_complete(["dog", "bird", "cat"])
    bad = torch.ones(2, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(CalibrationError, match="class index 2"):
        acc.update(bad, torch.tensor([0, 2]))


def test_distances_match_cdist_and_never_go_negative():
    x, _, centres = blobs()
    d = euclidean_distances(x, centres)
    exact = torch.cdist(x.double(), centres.double())
    assert_within(d, exact, dist_atol(x, centres, exact), "distances")
    same = euclidean_distances(centres, centres)
    assert (same >= 0).all()
    # d^2 = 0 computed by expansion: cancellation leaves up to (D + 2) eps (2 ||c||)^2, a large error
    # after the square root (2.8e-3 on AVX-512 for ||c||^2 ~ 50), which the bound covers.
    assert_within(same.diagonal(), torch.zeros(4), dist_atol(centres, centres, torch.zeros(4, 4)).diagonal(),
                  "self-distances")


def test_probabilities_are_softmax_of_negative_normalised_distances():
    d = torch.tensor([[1.0, 2.0, 4.0]])
    n = torch.tensor([1.0, 2.0, 2.0])
    p = class_probabilities(d, n)
    expected = torch.softmax(torch.tensor([[-1.0, -1.0, -2.0]]), 1)
    assert torch.allclose(p, expected)
    sharper = class_probabilities(d, n, temperature=0.5)
    assert sharper.max() > p.max()  # a lower temperature sharpens
    assert int(class_probabilities(torch.tensor([[0.5, 3.0]]), torch.ones(2)).argmax()) == 0  # nearest wins


def test_exit_rule_is_strict_and_threshold_one_disables():
    conf = torch.tensor([0.5, 0.6, 1.0])
    assert exits_here(conf, 0.5).tolist() == [False, True, True]
    assert exits_here(conf, 1.0).tolist() == [False, False, False]


def test_normaliser_is_mean_distance_over_all_samples():
    x, y, centres = blobs()
    acc = NormaliserAccumulator(4)
    for chunk in torch.arange(len(y)).chunk(5):
        acc.update(euclidean_distances(x[chunk], centres))
    exact = torch.cdist(x.double(), centres.double())
    assert_within(acc.value(), exact.mean(0), dist_atol(x, centres, exact).mean(0), "normalisers")


@pytest.mark.parametrize("metric", ["euclidean", "diag", "lda"])
def test_metric_heads_classify_blobs(metric):
    x, y, _ = blobs(k=4, d=12, spread=1.0)
    acc = ClassStatsAccumulator(4, 12, {"euclidean": "none", "diag": "diag", "lda": "full"}[metric])
    acc.update(x, y)
    head = fit_exit_head(acc, "full", metric)
    nacc = NormaliserAccumulator(4)
    nacc.update(head.distances(x))
    head.normaliser = nacc.value().float()
    p = head.probabilities(x)
    assert_within(p.sum(1), torch.ones(len(y)), sum_atol(2 * 4 + 2, 1.0), "row sums")  # K exps, a K-term sum
    assert (p.argmax(1) == y).double().mean() > 0.97
    if metric == "lda":
        assert head.means.shape == (4, 3)  # K - 1 discriminant directions
    assert head.flops((12,)) > 0



@pytest.mark.parametrize("metric", ["euclidean", "diag", "lda"])
def test_head_with_precomputed_terms_equals_the_reference_formulas(metric):
    """The serving head (``-2 C^T``, ``||c||^2`` and ``-1/(n tau)`` precomputed) gives Eq. 3-5 as written."""
    x, y, _ = blobs(k=5, d=12, spread=1.5, seed=3)
    acc = ClassStatsAccumulator(5, 12, {"euclidean": "none", "diag": "diag", "lda": "full"}[metric])
    acc.update(x, y)
    head = fit_exit_head(acc, "full", metric, temperature=0.25)
    nacc = NormaliserAccumulator(5)
    nacc.update(head.distances(x))
    head.normaliser = nacc.value().float()
    z = head.embed(x)
    exact = torch.cdist(z.double(), head.means.double())
    d_atol = dist_atol(z, head.means, exact)
    assert_within(head.distances(x), exact, d_atol, "distances")
    logits = -(exact / head.normaliser.double()) / 0.25
    reference = torch.softmax(logits, dim=1)
    # logit error: the distance error scaled by 1 / (n tau), plus the multiply's own rounding
    logit_atol = (d_atol / (head.normaliser.double() * 0.25) + 2 * EPS32 * logits.abs()).amax(1, keepdim=True)
    assert_within(head.probabilities(x), reference, softmax_atol(logit_atol, 5), "probabilities")
    assert torch.equal(head.probabilities(x), class_probabilities(head.distances(x), head.normaliser, 0.25))


def test_head_coefficients_follow_a_replaced_normaliser_and_temperature():
    x, y, _ = blobs(k=3, d=4, spread=1.0, seed=2)
    acc = ClassStatsAccumulator(3, 4, "none")
    acc.update(x, y)
    head = fit_exit_head(acc, "full", "euclidean")
    before = head.probabilities(x[:5])  # normaliser still 1: caches -1/(1 * 1)
    head.normaliser = torch.tensor([1.0, 2.0, 4.0])
    after = head.probabilities(x[:5])
    assert torch.allclose(after, class_probabilities(head.distances(x[:5]), head.normaliser))
    assert not torch.allclose(before, after)
    head.temperature = 0.5
    assert torch.allclose(head.probabilities(x[:5]),
                          class_probabilities(head.distances(x[:5]), head.normaliser, 0.5))

def test_lda_beats_euclidean_on_anisotropic_classes():
    g = torch.Generator().manual_seed(1)
    n = 500
    y = torch.arange(2).repeat_interleave(n)
    x = torch.randn(2 * n, 2, generator=g) * torch.tensor([10.0, 0.3])  # huge nuisance variance on dim 0
    x[:, 1] += y.float() * 1.5
    results = {}
    for metric, moments in (("euclidean", "none"), ("lda", "full")):
        acc = ClassStatsAccumulator(2, 2, moments)
        acc.update(x, y)
        head = fit_exit_head(acc, "full", metric)
        results[metric] = (head.distances(x).argmin(1) == y).double().mean().item()
    assert results["lda"] > 0.95 > results["euclidean"] + 0.1


def test_reduction_shapes():
    f = torch.randn(2, 16, 32, 32)
    assert reduce_feature(f, "full").shape == (2, 16 * 32 * 32)
    assert reduce_feature(f, "pool4").shape == (2, 16 * 16) == (2, reduced_dim((16, 32, 32), "pool4"))
    assert reduce_feature(f, "gap").shape == (2, 16)
    gap_atol = sum_atol(32 * 32 + 1, f.abs().double().mean((2, 3)))  # a 1024-term sum and a divide
    assert_within(reduce_feature(f, "gap"), f.double().mean((2, 3)), gap_atol, "global average pooling")
    assert reduce_feature(torch.randn(2, 64, 2, 2), "pool4").shape == (2, 256)  # smaller maps are kept
    with pytest.raises(ValueError):
        reduce_feature(f, "median")


def random_table(n=300, m=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(n, m, generator=g)
    pred = torch.randint(0, k, (n, m), generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    costs = ExitCosts(tuple(float(10 * (j + 1)) for j in range(m)), tuple(0.5 for _ in range(m - 1)))
    return DecisionTable(top, pred, labels), costs


def test_thresholds_zero_exit_first_and_one_exit_last():
    table, costs = random_table()
    t0 = torch.zeros(1, 5)
    t1 = torch.ones(1, 5)
    assert (table.exit_indices(t0) == 0).all()
    assert (table.exit_indices(t1) == 5).all()
    f0, a0 = table.evaluate(t0, costs)
    f1, a1 = table.evaluate(t1, costs)
    assert f0.item() == pytest.approx(10.5)  # stem + its class-means head
    assert f1.item() == pytest.approx(60.0)  # the plain network: disabled exits cost nothing
    assert a0.item() == pytest.approx((table.pred[:, 0] == table.labels).double().mean().item())
    assert a1.item() == pytest.approx((table.pred[:, -1] == table.labels).double().mean().item())


def test_bit_parallel_evaluation_equals_the_reference():
    table, costs = random_table(n=777, m=8)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(200, 7, generator=g)
    t[torch.rand(200, 7, generator=g) < 0.3] = 1.0
    t[0] = table.top_prob[5, :-1]  # exact ties: "p > T" is strict
    f1, a1 = table.evaluate(t, costs)
    f2, a2 = table.evaluate_reference(t, costs)
    assert torch.allclose(f1, f2) and torch.equal(a1, a2)


def test_upper_hull_keeps_only_the_concave_increasing_chain():
    pts = np.array([[1, 0.5], [2, 0.8], [3, 0.85], [4, 0.95], [2.5, 0.6], [5, 0.9], [1.5, 0.4], [4.5, 0.95]])
    hull = upper_hull(pts[:, 0], pts[:, 1])
    assert hull == [0, 1, 3]  # (3, .85) lies below the chord (2, .8)-(4, .95); (5, .9) and (4.5, .95) dominated
    assert upper_hull(np.array([1.0]), np.array([0.3])) == [0]


def _profiles():
    return [Profile("a", [0.1], 10, 0.1, 0.5), Profile("b", [0.5], 30, 0.3, 0.8),
            Profile("full", [1.0], 100, 1.0, 0.9)]


def test_select_by_target_gives_vertices_and_mixes():
    ps = _profiles()
    assert select_by_target(ps, min_accuracy=0.8).a == "b"
    mix = select_by_target(ps, min_accuracy=0.65)
    assert (mix.a, mix.b) == ("a", "b") and mix.lam == pytest.approx(0.5)
    assert mix.flops_fraction == pytest.approx(0.2) and mix.accuracy == pytest.approx(0.65)
    mix = select_by_target(ps, max_flops_fraction=0.65)
    assert (mix.a, mix.b) == ("b", "full") and mix.lam == pytest.approx(0.5)
    assert select_by_target(ps, max_flops_fraction=1.0).a == "full"
    with pytest.raises(TargetUnreachable):
        select_by_target(ps, min_accuracy=0.95)
    with pytest.raises(TargetUnreachable):
        select_by_target(ps, max_flops_fraction=0.05)


def test_time_sharing_hits_the_convex_mix():
    router = TimeSharingRouter(0.3)
    routed = np.concatenate([router.route(7) for _ in range(100)])
    assert abs(routed.sum() - 0.3 * 700) <= 1
    random_router = TimeSharingRouter(0.3, seed=0)
    share = random_router.route(20_000).mean()
    assert share == pytest.approx(0.3, abs=0.015)
    # Expected FLOPs/accuracy of the routed mix equal the convex combination.
    ps = _profiles()
    op = select_by_target(ps, max_flops_fraction=0.2)
    r = TimeSharingRouter(op.lam).route(10_000)
    flops = np.where(r, ps[0].flops_fraction, ps[1].flops_fraction).mean()
    assert flops == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("mode", ["paper", "quantile", "refine"])
def test_search_is_reproducible_and_always_has_the_full_network(mode):
    table, costs = random_table()
    r1 = search_thresholds(table, costs, mode, samples=300, seed=7)
    r2 = search_thresholds(table, costs, mode, samples=300, seed=7)
    assert torch.equal(r1.thresholds, r2.thresholds)
    assert bool((r1.thresholds[0] >= 1).all())
    assert r1.flops[0].item() == pytest.approx(costs.full)
    hull_flops = r1.flops[r1.hull]
    assert torch.all(hull_flops[1:] > hull_flops[:-1])
    assert torch.all(r1.accuracy[r1.hull][1:] > r1.accuracy[r1.hull][:-1])


def test_quantile_search_dominates_paper_search_on_peaked_confidences():
    # Confidences far below U[0,1]'s typical draw (K=10 class-means probabilities cluster at 0.1-0.3).
    g = torch.Generator().manual_seed(0)
    n, m = 2000, 10
    correct_p = torch.linspace(0.3, 0.95, m)
    labels = torch.randint(0, 10, (n,), generator=g)
    right = torch.rand(n, m, generator=g) < correct_p
    pred = torch.where(right, labels.unsqueeze(1), (labels.unsqueeze(1) + 1) % 10)
    top = 0.1 + 0.15 * torch.rand(n, m, generator=g) + 0.05 * right
    table = DecisionTable(top, pred, labels)
    costs = ExitCosts(tuple(float(j + 1) for j in range(m)), tuple(0.01 for _ in range(m - 1)))

    def area(result):
        f = (result.flops[result.hull] / costs.full).numpy()
        a = result.accuracy[result.hull].numpy()
        grid = np.linspace(f.min(), 1.0, 50)
        return np.interp(grid, f, a).mean()

    paper = search_thresholds(table, costs, "paper", 2000, seed=0)
    quant = search_thresholds(table, costs, "quantile", 2000, seed=0)
    assert area(quant) >= area(paper)
