"""Profile switches and bundle activations while clients classify: zero errors, every response consistent
with exactly one published (bundle, profile) state. Full size (1,000 switches, 20 activations, 32 clients)
runs in ``python -m bench.reliability``."""

from __future__ import annotations

from pathlib import Path

from bench.rel import swap
from tests.reliability.conftest import assert_passed


def test_switches_and_activations_under_load(tiny_model: Path, tmp_path: Path) -> None:
    res = swap.run(tiny_model, tmp_path, switches=200, activations=5, clients=8, time_limit_s=240)
    assert_passed(res)
    assert res.figures["responses_checked"] > 0 and res.figures["inconsistent_findings"] == 0


def test_the_checker_catches_a_mixed_state() -> None:
    """A sample whose FLOPs belong to another profile's thresholds is reported (the check has teeth)."""
    table = swap.BundleTable(backbone_cum=[10.0, 20.0, 30.0], head_cost=[1.0, 2.0],
                             thresholds={"a": [0.5, 1.0], "b": [0.5, 0.5]})
    assert table.expected_flops("a", 0) == 11.0
    assert table.expected_flops("a", 1) is None  # exit 1 is disabled in "a"
    assert table.expected_flops("a", 2) == 31.0 and table.expected_flops("b", 2) == 33.0
    checker = swap._Checker({"B": table})
    states = {3: swap._State("B", "a", "a", None)}
    body = {"version": 3, "bundle": "B", "profile": "a",
            "predictions": [{"profile": "a", "exit_index": 2, "flops": 33.0}]}
    headers = {"x-classmeans-bundle": "B", "x-classmeans-profile": "a", "x-classmeans-version": "3"}
    checker.check(states, body, headers)  # type: ignore[arg-type]
    assert len(checker.problems) == 1 and "impossible" in checker.problems[0]
    checker.check({}, body, headers)  # type: ignore[arg-type]
    assert "never published" in checker.problems[-1]
    # An internal-classifier profile: only its own exits, at its own cost.
    table.ic_flops["ic_prob-00"] = {1: 25.0, 2: 37.0}
    assert table.expected_flops("ic_prob-00", 1) == 25.0 and table.expected_flops("ic_prob-00", 0) is None
    states[4] = swap._State("B", "ic_prob-00", "ic_prob-00", None)
    ic_body = {"version": 4, "bundle": "B", "profile": "ic_prob-00",
               "predictions": [{"profile": "ic_prob-00", "exit_index": 1, "flops": 25.0}]}
    ic_headers = {"x-classmeans-bundle": "B", "x-classmeans-profile": "ic_prob-00", "x-classmeans-version": "4"}
    before = len(checker.problems)
    checker.check(states, ic_body, ic_headers)  # type: ignore[arg-type]
    assert len(checker.problems) == before
    ic_body["predictions"][0]["flops"] = 21.0  # the class-means cost of exit 1 under profile "a": a mixed state
    checker.check(states, ic_body, ic_headers)  # type: ignore[arg-type]
    assert len(checker.problems) == before + 1
