"""SIGTERM with requests in flight: every one of them answers 200, then the server exits 0."""

from __future__ import annotations

from pathlib import Path

from bench.rel import shutdown
from tests.reliability.conftest import assert_passed


def test_graceful_shutdown_finishes_in_flight_requests(tiny_model: Path, tmp_path: Path) -> None:
    res = shutdown.run(tiny_model, tmp_path, inflight=8)
    assert_passed(res)
    assert res.figures["answered_200"] == 8
