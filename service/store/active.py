"""``active.json`` as operations: which bundle serves, activation with full validation, resolution of a bundle id.

Shared by serving (which follows ``active.json``), the admin plane and the CLI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from service.errors import ProfileNotFound
from service.store.bundle_model import Bundle, load_bundle
from service.store.bundles import BundleError, list_bundle_ids, read_active, write_active
from service.store.model_dir import ModelSpec, load_model


def activate_bundle(model_dir: Path, bundle_id: str, profile: str | None = None,
                    spec: ModelSpec | None = None, num_exits: int | None = None) -> dict[str, Any]:
    """Validate a bundle fully, then point ``active.json`` at it (and at its default profile)."""
    if spec is None:
        spec, net = load_model(model_dir)
        num_exits = net.num_exits
    bundle = load_bundle(model_dir, bundle_id, spec, num_exits)
    name = profile or bundle.default_profile
    if name not in bundle.profile_names():
        raise ProfileNotFound(f"profile {name!r} is not in bundle {bundle_id}")
    prev = read_active_or_none(model_dir)
    active = {"bundle": bundle_id, "operating": {"a": name}, "version": int((prev or {}).get("version", 0)) + 1,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_active(model_dir, active)
    return active


def read_active_or_none(model_dir: Path) -> dict[str, Any] | None:
    try:
        return read_active(model_dir)
    except BundleError:
        return None


def resolve_bundle(model_dir: Path, spec: ModelSpec, num_exits: int, bundle_id: str | None) -> Bundle:
    if bundle_id is None:
        active = read_active(model_dir)
        if active is None:
            ids = list_bundle_ids(model_dir)
            if not ids:
                raise BundleError(f"{model_dir} has no bundle; run classmeans calibrate", code="bundle_not_found")
            bundle_id = ids[-1]
        else:
            bundle_id = str(active["bundle"])
    return load_bundle(model_dir, bundle_id, spec, num_exits)
