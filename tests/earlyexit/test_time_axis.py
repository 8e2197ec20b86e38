"""The time axis is additive like FLOPs: per-exit times, decomposition of measurements, profile estimates."""

from __future__ import annotations

import pytest
import torch

from service.earlyexit.time_axis import TimeTable, decompose, expected_ms


def _segments_time(table: TimeTable, thresholds: list[float], exit_at: int) -> float:
    """Plain simulation: one call per segment (stages up to the next enabled exit, then its head)."""
    m = table.num_exits
    total, calls = 0.0, 0
    for j in range(m):
        total += table.stage_ms[j]
        if j == m - 1:
            calls += 1
            break
        if thresholds[j] < 1.0:
            total += table.head_ms[j]
            calls += 1
            if j == exit_at:
                break
    return total + calls * table.call_ms


def test_exit_costs_equal_a_segment_by_segment_simulation():
    g = torch.Generator().manual_seed(0)
    m = 7
    table = TimeTable(1, tuple(torch.rand(m, generator=g).tolist()), tuple((0.1 * torch.rand(m - 1, generator=g))
                                                                           .tolist()), 0.05)
    for _ in range(20):
        t = torch.where(torch.rand(m - 1, generator=g) < 0.5, torch.rand(m - 1, generator=g), torch.ones(m - 1))
        per_exit = table.exit_costs().per_exit(t.view(1, -1))[0]
        enabled = [j for j in range(m - 1) if t[j] < 1.0]
        for e in [*enabled, m - 1]:
            assert per_exit[e].item() == pytest.approx(_segments_time(table, t.tolist(), e), rel=1e-9)


def test_no_exit_costs_the_whole_network():
    table = TimeTable(32, (1.0, 2.0, 3.0), (0.5, 0.5), 0.25)
    share = [0.0, 0.0, 1.0]
    assert expected_ms(share, [1.0, 1.0], table) == pytest.approx(table.full_ms) == pytest.approx(6.25)
    # both exits on: everyone pays both heads and their calls when nobody leaves early
    assert expected_ms(share, [0.5, 0.5], table) == pytest.approx(6.25 + 2 * 0.75)
    # half leave at exit 0: 0.5 * (1 + 0.75) + 0.5 * (6.25 + 1.5)
    assert expected_ms([0.5, 0.0, 0.5], [0.5, 0.5], table) == pytest.approx(0.5 * 1.75 + 0.5 * 7.75)


def test_decompose_recovers_stage_head_and_call_costs():
    stage, head, call = [1.0, 2.0, 3.0, 4.0], [0.3, 0.2, 0.1], 0.4
    single = [s + call for s in stage]
    with_head = [s + call + h for s, h in zip(stage, head, strict=False)]
    table = decompose(single, with_head, sum(stage) + call, batch_size=1)
    assert table.call_ms == pytest.approx(call)
    assert table.stage_ms == pytest.approx(tuple(stage)) and table.head_ms == pytest.approx(tuple(head))
    assert TimeTable.from_json(table.to_json()).full_ms == pytest.approx(table.full_ms, abs=1e-5)


def test_noise_never_gives_negative_costs():
    table = decompose([1.0, 1.0, 1.0], [0.9, 1.2], whole_ms=3.5, batch_size=1)
    assert table.call_ms == 0.0 and min(table.head_ms) == 0.0
    with pytest.raises(ValueError):
        TimeTable(1, (1.0, -1.0), (0.1,), 0.0)
    with pytest.raises(ValueError):
        expected_ms([1.0], [0.5], TimeTable(1, (1.0, 1.0), (0.1,), 0.0))


def test_select_by_time_walks_the_accuracy_time_hull():
    from service.earlyexit.hull import Profile, TargetUnreachable
    from service.earlyexit.time_axis import select_by_time

    ps = [Profile("a", [0.5], 10.0, 0.1, 0.60), Profile("b", [0.7], 30.0, 0.3, 0.80),
          Profile("c", [0.9], 50.0, 0.5, 0.78), Profile("full", [1.0], 100.0, 1.0, 0.90)]
    # time differs from FLOPs: c is cheap in FLOPs but slow; b is under the hull in time
    times = {"a": 0.2, "b": 0.7, "c": 0.4, "full": 1.0}
    op = select_by_time(ps, times, 0.4)
    assert op.a == "c" and op.b is None and op.flops_fraction == pytest.approx(0.5)
    op = select_by_time(ps, times, 0.7)  # between c (0.4) and full (1.0): b is not a vertex of the time hull
    assert {op.a, op.b} == {"c", "full"} and op.lam == pytest.approx(0.5)
    assert op.flops_fraction == pytest.approx(0.5 * 0.5 + 0.5 * 1.0) and op.accuracy == pytest.approx(0.84)
    with pytest.raises(TargetUnreachable, match=r"fastest 0\.2"):
        select_by_time(ps, times, 0.1)
    with pytest.raises(TargetUnreachable, match="classmeans timing"):
        select_by_time(ps, {}, 0.5)
