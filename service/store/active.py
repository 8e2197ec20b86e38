"""``active.json`` as operations: which bundle serves, activation with full validation, resolution of a bundle id.

Shared by serving (which follows ``active.json``), the admin plane and the CLI.

Every write goes through :func:`update_active`: under the store's writer lock, read the stored state, let the
caller decide from it, write the result with a version above the stored one. Versions only grow; a writer
whose decision was based on a state that another process has since replaced gets to see the newer one
first (and may refuse with ``active_conflict``), so no switch is lost silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.errors import ProfileNotFound
from service.store.bundle_model import Bundle, load_bundle
from service.store.bundles import BundleError, list_bundle_ids, read_active, write_active
from service.store.locks import DEFAULT_TIMEOUT_S, is_read_only_error, read_only_error, store_lock
from service.store.model_dir import ModelSpec, load_model

log = logging.getLogger("classmeans.store")


def active_version(active: dict[str, Any] | None) -> int:
    """The version of an ``active.json`` object (0 when absent or malformed)."""
    try:
        return max(0, int((active or {}).get("version", 0)))
    except (TypeError, ValueError):
        return 0


def update_active(model_dir: Path, decide: Callable[[dict[str, Any] | None, int], dict[str, Any]],
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Compare-and-swap ``active.json`` under the writer lock; returns what was written.

    ``decide(stored, stored_version)`` sees the stored state (None when absent or unreadable) and returns
    the new state, or raises to abort (nothing is written). The version written is
    ``max(decided, stored_version + 1)``, so versions only grow. Raises ``store_busy`` when the lock is
    held past ``timeout_s`` and ``store_read_only`` when the store cannot be written.
    """
    model_dir = Path(model_dir)
    with store_lock(model_dir, timeout_s=timeout_s):
        stored = read_active_or_none(model_dir)
        if stored is None and (model_dir / "active.json").exists():
            log.error("active.json in %s is unreadable; the next write replaces it", model_dir)
        base = active_version(stored)
        new = dict(decide(stored, base))
        new["version"] = max(active_version(new), base + 1)
        try:
            write_active(model_dir, new)
        except OSError as exc:
            if is_read_only_error(exc):
                raise read_only_error(model_dir / "active.json", exc) from exc
            raise
    return new


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
    return update_active(model_dir, lambda _stored, base: {
        "bundle": bundle_id, "operating": {"a": name}, "version": base + 1,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


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
