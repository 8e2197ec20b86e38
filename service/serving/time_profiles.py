"""A bundle's profiles on the measured time axis (``timing.json``, :mod:`service.store.timing`).

Times are per sample, in milliseconds, of the engine and machine that ``classmeans timing`` measured, at batch
1 (the latency case) and at the batcher's size (32 by default); ``time_fraction`` is a profile's time over the
full network's at the same batch size. A time-shared mix costs the convex mix of its two profiles' times.
Bundles without the file have no time axis: these functions return None / empty.
"""

from __future__ import annotations

import math
import os
import time

from service.earlyexit import Operating, Profile
from service.earlyexit.time_axis import TimeTable, profile_time_entry, time_hull
from service.errors import ServiceError
from service.store.bundle_model import Bundle

LATENCY_BATCH = "1"


class NoTimeAxis(ServiceError):
    """A time target was asked of a bundle whose profiles were never timed on this machine."""

    code, status = "no_time_axis", 409


def full_ms(bundle: Bundle, batch: str = LATENCY_BATCH) -> float | None:
    t = bundle.timing
    return float(t["full_ms"][batch]) if t and batch in t.get("full_ms", {}) else None


def profile_ms(bundle: Bundle, name: str, batch: str = LATENCY_BATCH) -> float | None:
    t = bundle.timing
    p = (t or {}).get("profiles", {}).get(name)
    return float(p["ms"][batch]) if p and batch in p.get("ms", {}) else None


def time_fractions(bundle: Bundle, batch: str = LATENCY_BATCH) -> dict[str, float]:
    """``{profile: time / full network's time}`` at ``batch``, for every timed profile."""
    full = full_ms(bundle, batch)
    if not full:
        return {}
    out = {}
    for name in bundle.profile_names():
        ms = profile_ms(bundle, name, batch)
        if ms is not None:
            out[name] = ms / full
    return out


def operating_ms(bundle: Bundle, op: Operating, batch: str = LATENCY_BATCH) -> float | None:
    """Expected ms per sample of an operating point (a mix: ``lam * a + (1 - lam) * b``)."""
    a = profile_ms(bundle, op.a, batch)
    if a is None:
        return None
    if op.b is None:
        return a
    b = profile_ms(bundle, op.b, batch)
    return None if b is None else op.lam * a + (1 - op.lam) * b


def require_time_axis(bundle: Bundle) -> float:
    """The full network's ms at batch 1, or :class:`NoTimeAxis` saying how to measure it."""
    full = full_ms(bundle)
    if full is None:
        raise NoTimeAxis(f"bundle {bundle.bundle_id} has no measured time axis on this machine: run "
                         "`classmeans timing --model-dir MODEL_DIR --data CALIBRATION_DATA` (then activate it again)")
    return full


def retimed(bundle: Bundle, tables: dict[int, TimeTable], engine: str, threads: int) -> dict | None:
    """The bundle's ``timing.json`` re-costed with ``tables`` measured here (``serve`` with
    ``CLASSMEANS_MEASURE_TIME=true``): each profile's stored exit shares (machine-independent: the selection
    split's exits under its thresholds, Eq. 6-7) times this machine's per-exit times
    (:func:`~service.earlyexit.time_axis.expected_ms`). None when the bundle has no shares to re-cost."""
    old = bundle.timing
    if not old or not all("exit_share" in p for p in old.get("profiles", {}).values()):
        return None
    doc = {**old, "engine": engine, "threads": threads, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "remeasured_at_start": True,
           "tables": {str(b): t.to_json() for b, t in tables.items()},
           "full_ms": {str(b): round(t.full_ms, 6) for b, t in tables.items()}, "profiles": {}}
    for name, p in old["profiles"].items():
        try:
            thresholds = bundle.profile(name).thresholds
        except KeyError:
            continue
        doc["profiles"][name] = profile_time_entry(p["exit_share"], thresholds, tables)
    return doc


def timed_batches(bundle: Bundle) -> list[int]:
    """The batch sizes the bundle's time axis was measured at (``[]``: untimed), ascending."""
    return sorted(int(b) for b in (bundle.timing or {}).get("full_ms", {}) if str(b).isdigit())


def nearest_batch(bundle: Bundle, batch: float) -> str | None:
    """The measured batch size closest to ``batch`` on a log scale (``argmin |log m - log batch|``), as
    timing.json keys it; None when untimed."""
    sizes = timed_batches(bundle)
    if not sizes:
        return None
    b = max(1.0, float(batch))
    return str(min(sizes, key=lambda m: abs(math.log(m) - math.log(b))))


def time_candidates(bundle: Bundle, batch: str = LATENCY_BATCH) -> list[Profile]:
    """The accuracy-time hull at ``batch`` as surrogate profiles (``flops_fraction`` = time fraction):
    :func:`~service.earlyexit.time_axis.time_hull`. Empty when the bundle has no time axis."""
    fractions = time_fractions(bundle, batch)
    return time_hull(bundle.profiles, fractions) if fractions else []


def operating_time_fraction(bundle: Bundle, op: Operating, batch: str = LATENCY_BATCH) -> float | None:
    """An operating point's expected time over the full network's at ``batch`` (None: untimed)."""
    ms, full = operating_ms(bundle, op, batch), full_ms(bundle, batch)
    return ms / full if ms is not None and full else None
