"""Fixtures of the reliability tests: the tiny test model, served by real `classmeans serve` processes.

The scenarios themselves live in ``bench/rel`` (``python -m bench.reliability`` runs them at full size on
the default model and writes ``docs/reliability.md``); these tests run them at CI size. Every server binds
127.0.0.1 only, on a private copy of the store under ``tmp_path``, and every loop is bounded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rel.common import ScenarioResult


@pytest.fixture()
def tiny_model(tiny_store_root: Path) -> Path:
    """The session's tiny calibrated model (read-only here: scenarios copy it before serving it)."""
    return tiny_store_root / "tiny"


def assert_passed(res: ScenarioResult) -> None:
    assert res.passed, "\n".join([f"{res.name}:", *res.failures()])
