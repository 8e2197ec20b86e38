"""A bundle's measured time axis on disk: ``bundles/<id>/timing.json`` (atomic, optional).

Written by ``classmeans timing`` (and ``classmeans calibrate --timing``) on the machine that serves:

    {"engine": "onnx" | "torch", "threads": T, "cpu": "...", "measured_at": "...", "loadavg": [..],
     "tables": {"1": TimeTable.to_json(), "32": ...},          # per-sample ms per stage / head / call
     "full_ms": {"1": ms, "32": ms},                          # the whole network, no exit consulted
     "selection": {"samples": N, "source": "..."},            # where the exit shares were measured
     "profiles": {name: {"ms": {"1": ms, "32": ms}, "time_fraction": {"1": f, "32": f},
                         "exit_share": [M values]}}}

Profiles are costed with :func:`service.earlyexit.time_axis.expected_ms` semantics: the share of selection
samples leaving at each exit times the measured time of leaving there. A bundle without the file serves in
FLOPs only (its profiles report no time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.store.bundles import BundleError, bundle_path, read_json_or_none, write_file_atomic

TIMING_FILE = "timing.json"


def write_timing(model_dir: Path, bundle_id: str, doc: dict[str, Any]) -> None:
    """Replace the bundle's timing.json atomically (the rest of the bundle never changes)."""
    check_timing(doc, bundle_path(model_dir, bundle_id) / TIMING_FILE)
    write_file_atomic(model_dir, bundle_id, TIMING_FILE, (json.dumps(doc, indent=2) + "\n").encode())


def read_timing(model_dir: Path, bundle_id: str) -> dict[str, Any] | None:
    """The bundle's timing.json, None when absent; malformed -> :class:`BundleError` (``invalid_bundle``)."""
    path = bundle_path(model_dir, bundle_id) / TIMING_FILE
    doc = read_json_or_none(path, "invalid_bundle")
    if doc is None:
        return None
    check_timing(doc, path)
    return doc


def check_timing(doc: Any, path: Path) -> None:
    ok = (isinstance(doc, dict) and isinstance(doc.get("tables"), dict) and isinstance(doc.get("profiles"), dict)
          and isinstance(doc.get("full_ms"), dict))
    if ok:
        for p in doc["profiles"].values():
            if not (isinstance(p, dict) and isinstance(p.get("ms"), dict)
                    and all(isinstance(v, int | float) and v >= 0 for v in p["ms"].values())):
                ok = False
                break
    if not ok:
        raise BundleError(f"{path} is malformed", code="invalid_bundle")
