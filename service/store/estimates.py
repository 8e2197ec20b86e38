"""What a profile's accuracy estimate rests on, and the measured test accuracy attached beside it.

A bundle's ``bundle.json`` carries ``estimate``: the selection split its profiles were measured on (``samples``),
its data source, and whether it ``overlaps`` the backbone's training data (True / False / None = unknown),
with a human ``label``. ``classmeans evaluate --attach`` writes ``measured.json`` into the bundle folder
(atomically; the rest of the bundle never changes). :func:`estimate_info` joins both for one profile, with
95 % Wilson intervals: the one function behind ``GET /profiles`` and ``classmeans profiles``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from service.earlyexit import Profile
from service.earlyexit.intervals import wilson_interval
from service.store.bundle_model import Bundle
from service.store.bundles import BundleError, bundle_path, read_json_or_none, write_file_atomic

MEASURED_FILE = "measured.json"
UNKNOWN = "training data unknown"


def provenance(bundle: Bundle) -> dict[str, Any]:
    """The bundle's ``estimate`` record; older bundles get one from their config (n) with overlap unknown."""
    est = dict(bundle.meta.get("estimate") or {})
    est.setdefault("samples", bundle.config.get("num_selection"))
    est.setdefault("overlaps_training", None)
    est.setdefault("label", UNKNOWN)
    return est


def interval(accuracy: float, n: int | None) -> list[float] | None:
    return [round(v, 6) for v in wilson_interval(accuracy, int(n))] if n else None


def estimate_info(bundle: Bundle, profile: Profile, measured: dict[str, Any] | None) -> dict[str, Any]:
    """``{accuracy, interval95, samples, overlaps_training, data, measured}`` for one class-means profile."""
    est = provenance(bundle)
    n = est.get("samples")
    out: dict[str, Any] = {"accuracy": profile.accuracy, "interval95": interval(profile.accuracy, n),
                           "samples": n, "overlaps_training": est["overlaps_training"], "data": est["label"],
                           "measured": None}
    got = (measured or {}).get("profiles", {}).get(profile.name)
    if got is not None:
        m = int(measured["num_samples"])
        out["measured"] = {"accuracy": got["accuracy"], "flops_fraction": got["flops_fraction"],
                           "interval95": interval(got["accuracy"], m), "samples": m,
                           "source": measured.get("source")}
    return out


def write_measured(model_dir: Path, bundle_id: str, report: dict[str, Any], source: str | None) -> dict[str, Any]:
    """Attach an evaluation report's per-profile test accuracy to the bundle (``measured.json``, atomic)."""
    doc = {"bundle": bundle_id, "source": source, "num_samples": int(report["num_samples"]),
           "full_network_accuracy": report["full_network_accuracy"],
           "profiles": {p["name"]: {"accuracy": p["accuracy"], "flops_fraction": p["flops_fraction"]}
                        for p in report["profiles"]},
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_file_atomic(model_dir, bundle_id, MEASURED_FILE, (json.dumps(doc, indent=2) + "\n").encode())
    return doc


def read_measured(model_dir: Path, bundle_id: str) -> dict[str, Any] | None:
    path = bundle_path(model_dir, bundle_id) / MEASURED_FILE
    doc = read_json_or_none(path, "invalid_bundle")
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles"), dict) or "num_samples" not in doc:
        raise BundleError(f"{path} is malformed", code="invalid_bundle")
    return doc
