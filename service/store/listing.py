"""The bundles of a model as a listing: each bundle's headline numbers, read from its JSON files.

For ``GET /admin/bundles`` and any other reader; read-only, tolerant (a bundle whose files do not parse is
listed as ``readable: false``, never an error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.store.bundles import bundle_path, list_bundle_ids


def bundle_summaries(model_dir: Path, active_id: str | None = None) -> list[dict[str, Any]]:
    """Every bundle in the store (oldest first) with its headline numbers; ``active_id`` marked active."""
    out = []
    for bid in list_bundle_ids(model_dir):
        path = bundle_path(model_dir, bid)
        entry: dict[str, Any] = {"id": bid, "active": bid == active_id}
        try:
            meta = json.loads((path / "bundle.json").read_text())
            profiles = json.loads((path / "profiles.json").read_text())
            heads = (meta.get("config") or {}).get("heads") or [{}]
            entry.update({"default_profile": profiles.get("default"),
                          "profiles": [p.get("name") for p in profiles.get("profiles", [])],
                          "heads": heads[0], "num_means": (meta.get("config") or {}).get("num_means"),
                          "num_selection": (meta.get("config") or {}).get("num_selection"),
                          "readable": True})
            report = path / "report.json"
            if report.is_file():
                entry["headline"] = json.loads(report.read_text()).get("headline")
        except (OSError, ValueError, AttributeError, TypeError):
            entry["readable"] = False
        out.append(entry)
    return out
