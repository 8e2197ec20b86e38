"""A recompute job failing part-way changes nothing; SIGKILL during a bundle write leaves the last good
bundle loadable. ``python -m bench.reliability`` runs every kill point on the default model."""

from __future__ import annotations

from pathlib import Path

from bench.rel import crash
from tests.reliability.conftest import assert_passed


def test_jobs_failing_part_way_leave_store_and_serving_as_before(tiny_model: Path, tmp_path: Path) -> None:
    res = crash.failing_jobs(tiny_model, tmp_path)
    assert_passed(res)


def test_sigkill_during_a_bundle_write_restarts_on_the_last_good_bundle(tiny_model: Path, tmp_path: Path) -> None:
    res = crash.sigkill_points(tiny_model, tmp_path, points=("staging_partial", "active_tmp", "activated"))
    assert_passed(res)
