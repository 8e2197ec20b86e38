"""``model_store/<model>/ics/<id>/``: a set of internal classifiers on disk, and its FLOPs table.

``ics.safetensors`` (``ic{i}.alpha``, ``ic{i}.linear.weight``, ``ic{i}.linear.bias``, float32), ``ics.json``
(format, backbone weights sha256, classes, IC exits with their input shapes and FLOPs, training configuration
and history, the tensors' sha256) and, when thresholds were searched, ``profiles.json`` (one list of profiles
per decision mode, with the bundle whose class means the ``cm``/``combined`` modes used). Written into a
``.tmp`` sibling and published with one ``os.replace``, like bundles. Serving reads these with
:func:`load_ics`; training writes them with :func:`save_ics` (``service.offline.ics``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from service.backbones import StageProfile
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.ic_rules import ICCosts
from service.earlyexit.modes import get_mode
from service.store.atomic import fresh_staging_dir, publish_dir_atomic
from service.store.bundles import BUNDLE_ID_RE, BundleError, new_bundle_id
from service.store.model_dir import ModelSpec, check_provenance

ICS_DIR = "ics"
ICS_TENSORS = "ics.safetensors"
ICS_JSON = "ics.json"
ICS_PROFILES = "profiles.json"
ICS_FORMAT = 1


class ICError(BundleError):
    """A set of ICs is missing, corrupt, or does not belong to this model."""

    code = "invalid_ics"



def ic_costs(stage_profile: StageProfile, ics: ICSet, cm_heads: dict[int, ExitHead] | None = None) -> ICCosts:
    """FLOPs table of the IC exits: cumulative backbone FLOPs at each IC exit and the full network, each IC's
    FLOPs, and the class-means head's FLOPs at the same exit (0 where there is none)."""
    cum = stage_profile.cumulative
    shapes = stage_profile.shapes
    heads = cm_heads or {}
    return ICCosts((*(float(cum[e]) for e in ics.exits), float(stage_profile.total)),
                   tuple(float(f) for f in ics.flops()),
                   tuple(float(heads[e].flops(shapes[e])) if e in heads else 0.0 for e in ics.exits))



def profile_thresholds(profile: dict[str, Any]) -> torch.Tensor:
    """A stored profile's thresholds as the tensor :mod:`service.earlyexit.ic_rules` takes (its mode's
    stored form: :meth:`~service.earlyexit.modes.DecisionMode.thresholds_tensor`)."""
    return get_mode(str(profile["mode"])).thresholds_tensor(profile["thresholds"])



def ics_root(model_dir: Path) -> Path:
    return Path(model_dir) / ICS_DIR


def list_ics_ids(model_dir: Path) -> list[str]:
    root = ics_root(model_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and BUNDLE_ID_RE.match(p.name))


def save_ics(model_dir: Path, spec: ModelSpec, ics: ICSet, stage_profile: StageProfile, info: dict[str, Any],
             profiles: dict[str, Any] | None = None, tag: str = "") -> tuple[str, Path]:
    """Write ``ics/<id>/`` atomically; returns ``(id, path)``."""
    ics_id = new_bundle_id(tag)
    final = ics_root(model_dir) / ics_id
    staging = fresh_staging_dir(final)
    try:
        blob = save(ics.tensors())
        flops = ics.flops()
        meta = {
            "format": ICS_FORMAT, "id": ics_id, "model": spec.name, "weights_sha256": spec.weights_sha256,
            "classes": list(spec.classes), "kind": "sdn_internal_classifiers",
            "architecture": "mixed max/avg pooling to 4x4 (learnable alpha) + Linear",
            "flops_unit": "FLOPs, 2 per multiply-add; IC = linear (FlopCounterMode) + pooling 2CHW + mix 3C16",
            "flops_full": float(stage_profile.total),
            "ics": [{"index": i, "exit": e, "in_shape": list(ic.in_shape), "kernel": ic.kernel,
                     "feature_dim": ic.feature_dim, "flops": int(f),
                     "backbone_flops_fraction": stage_profile.cumulative[e] / stage_profile.total}
                    for i, (ic, e, f) in enumerate(zip(ics.ics, ics.exits, flops, strict=True))],
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            **info,
        }
        (staging / ICS_TENSORS).write_bytes(blob)
        (staging / ICS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if profiles is not None:
            (staging / ICS_PROFILES).write_text(json.dumps(profiles, indent=2) + "\n")
        publish_dir_atomic(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ics_id, final


def load_ics(model_dir: Path, spec: ModelSpec, stage_profile: StageProfile, ics_id: str | None = None
             ) -> tuple[ICSet, dict[str, Any], dict[str, Any] | None]:
    """Read and validate ``ics/<id>/`` (the newest when ``ics_id`` is None) -> (ICs, meta, profiles or None).

    Checks: format, the backbone weights' sha256 and classes, the tensors' checksum, exits strictly
    increasing and inside the backbone, input shapes equal to the backbone's, tensor shapes, float32,
    finite values, ``0 <= alpha <= 1``.
    """
    if ics_id is None:
        ids = list_ics_ids(model_dir)
        if not ids:
            raise ICError(f"{model_dir} has no internal classifiers; run classmeans train-ics", code="ics_not_found")
        ics_id = ids[-1]
    if not BUNDLE_ID_RE.match(ics_id):
        raise ICError(f"invalid IC set id {ics_id!r}", code="ics_not_found")
    path = ics_root(model_dir) / ics_id
    if not path.is_dir():
        raise ICError(f"IC set {ics_id!r} not found", code="ics_not_found")
    try:
        meta = json.loads((path / ICS_JSON).read_text())
        blob = (path / ICS_TENSORS).read_bytes()
        profiles = json.loads((path / ICS_PROFILES).read_text()) if (path / ICS_PROFILES).is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ICError(f"IC set {ics_id!r} is unreadable: {exc}") from exc
    try:
        if meta.get("format") != ICS_FORMAT:
            raise ICError(f"IC set {ics_id}: unsupported format {meta.get('format')!r}")
        if meta.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
            raise ICError(f"IC set {ics_id}: {ICS_TENSORS} does not match its checksum")
        check_provenance(meta, spec, f"IC set {ics_id}", "trained", ICError, "ics_model_mismatch")
        entries = meta["ics"]
        exits = [int(e["exit"]) for e in entries]
        n_early = len(stage_profile.shapes) - 1
        if not exits or exits != sorted(set(exits)) or exits[0] < 0 or exits[-1] >= n_early:
            raise ICError(f"IC set {ics_id}: exits {exits} must be increasing early exits of the backbone")
        shapes = [tuple(int(v) for v in e["in_shape"]) for e in entries]
        for e, s in zip(exits, shapes, strict=True):
            if tuple(stage_profile.shapes[e]) != s:
                raise ICError(f"IC set {ics_id}: exit {e} reads {s}, the backbone gives {stage_profile.shapes[e]}",
                              code="ics_model_mismatch")
        try:
            tensors = load_file(str(path / ICS_TENSORS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ICError(f"IC set {ics_id}: cannot read tensors: {exc}") from exc
        ics = ICSet(exits, shapes, spec.num_classes, seed=None)
        ics.load_state_dict(_checked_state(ics_id, tensors, ics.state_dict(), len(exits)), strict=True)
    except ICError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ICError(f"IC set {ics_id} is malformed: {exc!r}") from exc
    return ics.eval(), meta, profiles


_IC_TENSORS = ("alpha", "linear.weight", "linear.bias")


def _checked_state(ics_id: str, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], n: int
                   ) -> dict[str, torch.Tensor]:
    """The stored ``ic{i}.*`` tensors as the ICs' state dict: present, float32, the right shapes, finite,
    ``0 <= alpha <= 1``, nothing else."""
    state = {}
    for i in range(n):
        for k in _IC_TENSORS:
            name = f"ic{i}.{k}"
            t = tensors.get(name)
            want = expected[f"ics.{i}.{k}"]
            if t is None or t.dtype != torch.float32 or t.shape != want.shape:
                raise ICError(f"IC set {ics_id}: tensor {name} missing or not float32 {tuple(want.shape)}")
            if not torch.isfinite(t).all():
                raise ICError(f"IC set {ics_id}: tensor {name} has non-finite values")
            state[f"ics.{i}.{k}"] = t
        if not 0.0 <= float(state[f"ics.{i}.alpha"]) <= 1.0:
            raise ICError(f"IC set {ics_id}: alpha of IC {i} outside [0, 1]")
    extra = set(tensors) - {f"ic{i}.{k}" for i in range(n) for k in _IC_TENSORS}
    if extra:
        raise ICError(f"IC set {ics_id}: unexpected tensors {sorted(extra)}")
    return state
