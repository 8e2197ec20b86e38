"""Which profiles the serving benchmark measures (bench/serving.py)."""

from __future__ import annotations

from bench.serving import pick_ic_profiles, pick_profiles


def _p(name: str, acc: float, flops: float, mode: str = "cm") -> dict:
    return {"name": name, "accuracy": acc, "flops_fraction": flops, "mode": mode}


LISTING = {"default_profile": "hull-03", "profiles": [
    _p("hull-00", 0.50, 0.01), _p("hull-01", 0.70, 0.20), _p("hull-02", 0.90, 0.50), _p("hull-03", 0.936, 0.75),
    _p("full", 0.94, 1.0),
    _p("ic_prob-00", 0.60, 0.15, "ic_prob"), _p("ic_prob-01", 0.937, 0.72, "ic_prob"),
    _p("ic_prob-02", 0.94, 0.80, "ic_prob"),
    _p("combined-00", 0.92, 0.50, "combined"),  # never within 0.5 points: no combined row
]}


def test_ic_profiles_are_the_cheapest_within_half_a_point_per_mode():
    assert pick_ic_profiles(LISTING) == ["ic_prob-01"]
    assert pick_ic_profiles(LISTING, tolerance=0.03) == ["combined-00", "ic_prob-01"]
    assert pick_ic_profiles({"profiles": [_p("hull-00", 0.5, 0.1)]}) == []  # no full row: nothing to compare


def test_profile_thinning_keeps_default_and_target():
    cm = {"default_profile": "hull-03", "profiles": [p for p in LISTING["profiles"] if p["mode"] == "cm"]}
    assert pick_profiles(cm, 10, "hull-02") == ["hull-00", "hull-01", "hull-02", "hull-03"]
    picked = pick_profiles(cm, 2, "hull-01")
    assert set(picked) == {"hull-01", "hull-03"}
