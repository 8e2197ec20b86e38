"""Class-mean bundles on disk: ``model_store/<model>/bundles/<id>/`` and the ``active.json`` pointer.

A bundle directory holds ``bundle.json`` (exits, FLOPs table, configuration, checksums),
``tensors.safetensors`` (class means, normalisers, metric transforms per exit), ``profiles.json``
(hull points with their held-out accuracy and FLOPs) and report files. It is written complete into a
``.<id>.tmp`` sibling and published with one ``os.replace``; readers never see half a bundle.
No pickle: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from service.errors import ServiceError
from service.store.atomic import (
    TMP_SUFFIX,
    fresh_staging_dir,
    publish_dir_atomic,
    write_bytes_atomic,
    write_json_atomic,
)

BUNDLES_DIR = "bundles"
ACTIVE_FILE = "active.json"
BUNDLE_JSON = "bundle.json"
TENSORS_FILE = "tensors.safetensors"
PROFILES_JSON = "profiles.json"
BUNDLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


class BundleError(ServiceError, ValueError):
    """A bundle (or ``active.json``) is missing, corrupt, or does not belong to this model."""

    code = "invalid_bundle"
    status = 422
    STATUS_BY_CODE: ClassVar[dict[str, int]] = {"bundle_not_found": 404, "active_conflict": 409,
                                                "store_read_only": 409, "store_busy": 503}


@dataclass
class BundleFiles:
    """The raw contents of a bundle directory."""

    bundle_id: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    profiles: dict[str, Any]
    path: Path


def new_bundle_id(tag: str = "") -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    suffix = f"-{tag}" if tag else ""
    return f"{stamp}-{secrets.token_hex(3)}{suffix}"


def check_bundle_id(bundle_id: str) -> str:
    if not BUNDLE_ID_RE.match(bundle_id) or bundle_id.endswith(TMP_SUFFIX):
        raise BundleError(f"invalid bundle id {bundle_id!r}", code="bundle_not_found")
    return bundle_id


def bundle_path(model_dir: Path, bundle_id: str) -> Path:
    return Path(model_dir) / BUNDLES_DIR / check_bundle_id(bundle_id)


def write_bundle(model_dir: Path, bundle_id: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                 profiles: dict[str, Any], extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete bundle atomically; returns its directory. Never overwrites an existing bundle."""
    final = bundle_path(model_dir, bundle_id)
    staging = fresh_staging_dir(final)
    try:
        blob = save({k: v.detach().contiguous() for k, v in tensors.items()})
        meta = {**meta, "id": bundle_id, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        (staging / TENSORS_FILE).write_bytes(blob)
        (staging / BUNDLE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / PROFILES_JSON).write_text(json.dumps(profiles, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"bad extra file name {name!r}")
            (staging / name).write_bytes(data)
        publish_dir_atomic(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_bundle(model_dir: Path, bundle_id: str) -> BundleFiles:
    """Read and checksum a bundle's files; shapes and meaning are checked by the runtime."""
    path = bundle_path(model_dir, bundle_id)
    if not path.is_dir():
        raise BundleError(f"bundle {bundle_id!r} not found", code="bundle_not_found")
    try:
        meta = json.loads((path / BUNDLE_JSON).read_text())
        profiles = json.loads((path / PROFILES_JSON).read_text())
        blob = (path / TENSORS_FILE).read_bytes()
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {bundle_id!r} is unreadable: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(profiles, dict):
        raise BundleError(f"bundle {bundle_id!r}: bundle.json and profiles.json must be objects")
    if meta.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
        raise BundleError(f"bundle {bundle_id!r}: tensors.safetensors does not match its checksum")
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"bundle {bundle_id!r}: cannot read tensors: {exc}") from exc
    return BundleFiles(bundle_id, meta, tensors, profiles, path)


def list_bundle_ids(model_dir: Path) -> list[str]:
    root = Path(model_dir) / BUNDLES_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and BUNDLE_ID_RE.match(p.name))


def update_profiles(model_dir: Path, bundle_id: str, profiles: dict[str, Any]) -> None:
    write_json_atomic(bundle_path(model_dir, bundle_id) / PROFILES_JSON, profiles)


def read_json_or_none(path: Path, code: str) -> Any | None:
    """The JSON in ``path``, None when there is no such file; an unreadable file is a :class:`BundleError`
    with ``code``."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is unreadable: {exc}", code=code) from exc


def read_active(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / ACTIVE_FILE
    obj = read_json_or_none(path, "invalid_active")
    if obj is None:
        return None
    if not isinstance(obj, dict) or "bundle" not in obj:
        raise BundleError(f"{path} names no bundle", code="invalid_active")
    return obj


def write_active(model_dir: Path, active: dict[str, Any]) -> None:
    write_json_atomic(Path(model_dir) / ACTIVE_FILE, active)


def write_file_atomic(model_dir: Path, bundle_id: str, name: str, data: bytes) -> None:
    write_bytes_atomic(bundle_path(model_dir, bundle_id) / name, data)
