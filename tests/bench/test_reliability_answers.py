"""The reliability suite's "same answers" check (bench/rel/common.py): an answer must be the answer, for that
image, of a profile that may serve (the point, a vertex of a time-shared mix, or any hull point under the
autopilot), and the profile the answer names must be that one. Pure: no server."""

from __future__ import annotations

import pytest

from bench.rel.common import ServingPoints, answer_problems, same_answer
from bench.reliability import mix_target

A = [(3, 10, 1.0e8, 0.91), (5, 28, 2.5e8, 0.40)]  # vertex A's answers for images 0 and 1
B = [(3, 4, 0.4e8, 0.88), (1, 12, 1.2e8, 0.55)]  # vertex B's


def points(*names: str, autopilot: bool = False) -> ServingPoints:
    refs = {"hull-24": A, "hull-25": B, "full": [(3, 28, 2.5e8, 0.95), (5, 28, 2.5e8, 0.40)]}
    return ServingPoints(set(names), {n: refs[n] for n in names}, autopilot)


def test_a_mix_may_answer_each_image_with_either_vertex() -> None:
    got = [("hull-24", A[0]), ("hull-25", B[1])]
    assert answer_problems(got, points("hull-24", "hull-25")) == []


def test_an_answer_equal_to_no_vertex_fails() -> None:
    got = [("hull-24", (7, 10, 1.0e8, 0.91)), ("hull-25", B[1])]
    problems = answer_problems(got, points("hull-24", "hull-25"))
    assert len(problems) == 1 and problems[0].startswith("image 0")


def test_the_named_vertex_must_be_the_one_it_equals() -> None:
    got = [("hull-25", A[0]), ("hull-25", B[1])]  # equals A's answer but says B served it
    problems = answer_problems(got, points("hull-24", "hull-25"))
    assert problems and "named 'hull-25' but equals ['hull-24']" in problems[0]


def test_a_profile_outside_the_allowed_set_fails_even_when_the_answer_matches() -> None:
    got = [("full", A[0]), ("hull-25", B[1])]
    problems = answer_problems(got, points("hull-24", "hull-25"))
    assert problems and "not one of the allowed" in problems[0]


def test_a_single_point_is_the_old_exact_check() -> None:
    assert answer_problems([("hull-24", A[0]), ("hull-24", A[1])], points("hull-24")) == []
    assert answer_problems([("hull-24", A[0]), ("hull-24", B[1])], points("hull-24"))


def test_autopilot_accepts_any_hull_point_the_answer_names() -> None:
    got = [("full", (3, 28, 2.5e8, 0.95)), ("hull-24", A[1])]
    assert answer_problems(got, points("hull-24", "hull-25", "full", autopilot=True)) == []
    assert "autopilot" in points("full", autopilot=True).describe()


def test_confidence_tolerance_and_exact_class_exit_flops() -> None:
    assert same_answer((3, 10, 1.0e8, 0.91), (3, 10, 1.0e8, 0.91005))
    assert not same_answer((3, 10, 1.0e8, 0.91), (3, 10, 1.0e8, 0.912))
    assert not same_answer((3, 10, 1.0e8, 0.91), (3, 11, 1.0e8, 0.91))
    assert not same_answer((3, 10, 1.0e8, 0.91), (3, 10, 1.1e8, 0.91))


def test_mix_target_is_halfway_and_names_must_exist() -> None:
    profiles = [{"name": "hull-24", "flops_fraction": 0.4}, {"name": "hull-25", "flops_fraction": 0.5}]
    assert mix_target(profiles, "hull-24", "hull-25") == pytest.approx(0.45)
    with pytest.raises(ValueError, match="hull-99"):
        mix_target(profiles, "hull-24", "hull-99")


class _FakeClient:
    def __init__(self, body: dict[str, object]) -> None:
        self.body = body

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get(self, path: str) -> _FakeClient:
        return self

    def json(self) -> dict[str, object]:
        return self.body


class _FakeServer:
    def __init__(self, body: dict[str, object]) -> None:
        self.body = body

    def client(self) -> _FakeClient:
        return _FakeClient(self.body)


def test_serving_state_leaves_the_point_to_an_engaged_autopilot() -> None:
    from bench.rel.common import serving_state

    fixed = {"bundle": "b", "version": 3, "active": {"name": "hull-24~hull-25@0.5"}, "autopilot": {"enabled": False}}
    assert serving_state(_FakeServer(fixed)) == {"bundle": "b", "version": 3, "active": "hull-24~hull-25@0.5"}
    auto = {"bundle": "b", "version": 3, "active": {"name": "hull-14"},
            "autopilot": {"enabled": True, "target_ms": 200.0, "min_accuracy": None, "mode": "cm"}}
    moved = {**auto, "active": {"name": "hull-30~hull-31@0.2"}}
    assert serving_state(_FakeServer(auto)) == serving_state(_FakeServer(moved))
    assert "active" not in serving_state(_FakeServer(auto))
