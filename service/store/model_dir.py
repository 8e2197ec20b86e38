"""``model_store/<model>/``: ``model.json`` (architecture, classes, input, normalisation) and weights.

Weights are safetensors only; ``model.json`` records their sha256 so a bundle can prove it was
calibrated on these exact weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.backbones import StagedNetwork, build_backbone
from service.errors import ServiceError
from service.ingest.preprocessing import Preprocessing
from service.store.atomic import write_bytes_atomic, write_json_atomic

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"


class ModelDirError(ServiceError, ValueError):
    """The model directory is missing, malformed, or its weights do not fit its architecture."""

    code = "invalid_model"
    status = 422


@dataclass
class ModelSpec:
    """What ``model.json`` says. ``mean``/``std`` apply to RGB values scaled to [0, 1]."""

    name: str
    architecture: dict[str, Any]
    classes: list[str]
    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    weights_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    resize: dict[str, Any] = field(default_factory=lambda: {"mode": "direct"})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        """The one resize rule every decoded image goes through (calibration, evaluation, serving)."""
        return Preprocessing.from_json(self.input_size, self.resize)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "classes": list(self.classes),
            "input": {"size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                      "resize": self.preprocessing.to_json(),
                      "color": "RGB", "scale": "pixel / 255, then (x - mean) / std"},
            "weights": WEIGHTS_FILE,
            "weights_sha256": self.weights_sha256,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ModelSpec:
        try:
            inp = obj.get("input", {})
            classes = [str(c) for c in obj["classes"]]
            spec = cls(
                name=str(obj["name"]),
                architecture=dict(obj["architecture"]),
                classes=classes,
                input_size=tuple(int(v) for v in inp.get("size", (32, 32))),
                mean=tuple(float(v) for v in inp.get("mean", CIFAR10_MEAN)),
                std=tuple(float(v) for v in inp.get("std", CIFAR10_STD)),
                weights_sha256=str(obj.get("weights_sha256", "")),
                extra=dict(obj.get("extra", {})),
                resize=dict(inp.get("resize") or {"mode": "direct"}),
            )
            spec.preprocessing  # noqa: B018 -- validates the resize rule now, not at the first image
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"malformed model.json: {exc!r}") from exc
        if len(spec.classes) < 2 or len(set(spec.classes)) != len(spec.classes):
            raise ModelDirError("model.json must list at least two distinct classes")
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise ModelDirError("model.json input mean/std must be three values, std > 0")
        return spec


def check_provenance(meta: dict[str, Any], spec: ModelSpec, what: str, made: str, error: Callable[..., Exception],
                     code: str) -> None:
    """Refuse stored state (a bundle, an IC set) ``made`` ("calibrated", "trained") on other weights or for
    other classes than ``spec``'s: raise ``error(message, code=code)``."""
    if spec.weights_sha256 and meta.get("weights_sha256") != spec.weights_sha256:
        raise error(f"{what} was {made} on other weights than {spec.name}'s", code=code)
    if list(meta.get("classes", [])) != list(spec.classes):
        raise error(f"{what}: classes differ from the model's", code=code)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_spec(model_dir: Path) -> ModelSpec:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise ModelDirError(f"{path} not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"cannot read {path}: {exc}") from exc
    return ModelSpec.from_json(obj)


def save_model(model_dir: Path, spec: ModelSpec, net: StagedNetwork) -> ModelSpec:
    """Write weights (fp32 safetensors, atomically) then ``model.json`` with their sha256."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() if v.is_floating_point()
             else v.detach().cpu().contiguous().clone() for k, v in net.module.state_dict().items()}
    tmp = model_dir / f".{WEIGHTS_FILE}.staging.tmp"
    save_file(state, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    write_bytes_atomic(model_dir / WEIGHTS_FILE, data)
    spec.weights_sha256 = hashlib.sha256(data).hexdigest()
    write_json_atomic(model_dir / MODEL_FILE, spec.to_json())
    return spec


def load_model(model_dir: Path, verify_checksum: bool = True) -> tuple[ModelSpec, StagedNetwork]:
    """Build the network from ``model.json`` and load its safetensors weights strictly, in eval mode.

    A cascade's ``model.json`` (service/store/cascade_dir.py) gives a
    :class:`~service.backbones.cascade_network.CascadeNetwork` of its members instead (typed as a network:
    callers that need stages check ``is_cascade(spec)`` first)."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    if str(spec.architecture.get("family", "")) == "cascade":
        from service.store.cascade_dir import load_cascade

        return spec, load_cascade(model_dir, spec, verify_checksum)  # type: ignore[return-value]
    wpath = model_dir / WEIGHTS_FILE
    if not wpath.is_file():
        raise ModelDirError(f"{wpath} not found")
    if verify_checksum and spec.weights_sha256 and sha256_file(wpath) != spec.weights_sha256:
        raise ModelDirError(f"{wpath} does not match the sha256 recorded in model.json")
    net = build_backbone(spec.architecture, spec.num_classes, spec.input_size[0])
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError) as exc:
        raise ModelDirError(f"cannot read {wpath}: {exc}") from exc
    try:
        net.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelDirError(f"weights do not fit architecture {spec.architecture}: {exc}") from exc
    net.module.eval()
    net.input_size = spec.input_size
    return spec, net
