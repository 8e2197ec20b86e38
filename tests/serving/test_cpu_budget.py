"""Workers x threads fit the cores a process may use (affinity and cgroup quota), never the host's count."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.serving.cpu_budget import (
    budget_from,
    intra_op_threads,
    parse_cgroup1_quota,
    parse_cgroup2_cpu_max,
    plan_threads,
    read_cpu_budget,
    read_quota_cores,
)


@pytest.mark.parametrize(("text", "cores"), [("max 100000", None), ("150000 100000", 1.5), ("200000 100000", 2.0),
                                             ("garbage", None), ("0 100000", None), ("", None)])
def test_cgroup2_cpu_max(text, cores):
    assert parse_cgroup2_cpu_max(text) == cores


def test_cgroup1_quota():
    assert parse_cgroup1_quota("-1\n", "100000\n") is None
    assert parse_cgroup1_quota("50000\n", "100000\n") == 0.5
    assert parse_cgroup1_quota("x", "100000") is None


def test_budget_takes_the_tighter_of_affinity_and_quota():
    assert budget_from(8, None, 64).cores == 8
    assert budget_from(8, 2.0, 64).cores == 2
    assert budget_from(8, 1.5, 64).cores == 2  # a fractional quota rounds up: 1.5 cores keep two busy
    assert budget_from(1, 4.0, 64).cores == 1
    assert budget_from(4, 0.2, 64).cores == 1
    assert "quota 2 cores" in budget_from(8, 2.0, 64).describe()


def test_quota_read_from_a_cgroup2_tree(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    assert read_quota_cores(tmp_path) == 3.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert read_quota_cores(tmp_path) is None


def test_quota_read_from_a_cgroup1_tree(tmp_path: Path):
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert read_quota_cores(tmp_path) == 1.0


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 16])
def test_default_plan_is_one_single_threaded_worker_per_core(cores):
    plan = plan_threads(cores)
    assert (plan.workers, plan.threads) == (cores, 1) and not plan.oversubscribed


@pytest.mark.parametrize(("cores", "workers", "threads", "want"), [
    (4, 1, 0, (1, 4)), (4, 2, 0, (2, 2)), (4, 3, 0, (3, 1)), (2, 4, 0, (4, 1)),
    (4, 0, 2, (2, 2)), (4, 0, 8, (1, 8)), (4, 2, 2, (2, 2)), (2, 2, 2, (2, 2))])
def test_plans_fill_the_cores_around_what_is_set(cores, workers, threads, want):
    plan = plan_threads(cores, workers, threads)
    assert (plan.workers, plan.threads) == want
    assert plan.oversubscribed == (want[0] * want[1] > cores)


def test_intra_op_threads_of_one_process():
    b = budget_from(4, None, 4)
    assert intra_op_threads(3, 2, b) == 3  # configured wins
    assert intra_op_threads(0, 2, b) == 2
    assert intra_op_threads(0, 0, b) == 4  # alone: every usable core


def test_this_machine_has_a_budget():
    b = read_cpu_budget()
    assert 1 <= b.cores <= b.affinity <= max(b.host, b.affinity)


def test_serve_logs_its_choice(caplog):
    from service.api.settings import Settings
    from service.cli.serve_cmd import choose_plan

    caplog.set_level("INFO", logger="classmeans.serve")
    plan = choose_plan(Settings(admin_token="x" * 16))
    assert (plan.workers, plan.threads) == (read_cpu_budget().cores, 1)
    assert f"{plan.workers} worker(s) x 1 intra-op thread(s)" in caplog.text and "usable core" in caplog.text
    caplog.clear()
    plan = choose_plan(Settings(admin_token="x" * 16, workers=1, torch_threads=64))
    assert plan.oversubscribed and any(r.levelname == "WARNING" for r in caplog.records)
