"""Build a staged network from its description in ``model.json``.

``architecture`` is one of::

    {"family": "cifar_resnet", "depth": 56}
    {"family": "torchvision", "name": "resnet152"}      (also mobilenet_v3_large, efficientnet_b0, convnext_tiny,
                                                          regnet_y_400mf, vgg16_bn, densenet121, ...)
    {"family": "custom", "entrypoint": "package.module:function", "kwargs": {...}}

A custom entrypoint is any importable callable ``f(num_classes: int, **kwargs) -> StagedNetwork``; build
the module, list the sub-modules that form its stages in order (each maps the previous stage's output to
the next), and give the head that maps the last stage's output to logits. See ``tests/custom_backbone.py``.
"""

from __future__ import annotations

import importlib
from typing import Any

from service.backbones.cifar_resnet import DEPTHS, cifar_resnet
from service.backbones.staged import StagedNetwork
from service.backbones.torchvision_features import NAMES as FEATURE_NAMES
from service.backbones.torchvision_features import torchvision_features
from service.backbones.torchvision_resnet import NAMES as RESNET_NAMES
from service.backbones.torchvision_resnet import torchvision_resnet
from service.errors import ServiceError

TORCHVISION_NAMES = RESNET_NAMES + FEATURE_NAMES


class BackboneError(ServiceError, ValueError):
    """The architecture description cannot be turned into a staged network."""

    code = "invalid_backbone"
    status = 422


def architecture_from_name(name: str) -> dict[str, Any]:
    """``resnet56`` -> cifar_resnet depth 56; ``resnet152`` -> torchvision; ``pkg.mod:fn`` -> custom."""
    if ":" in name:
        return {"family": "custom", "entrypoint": name}
    if name.startswith("cifar_resnet") or name in {f"resnet{d}" for d in DEPTHS}:
        return {"family": "cifar_resnet", "depth": int(name.removeprefix("cifar_").removeprefix("resnet"))}
    if name in TORCHVISION_NAMES:
        return {"family": "torchvision", "name": name}
    known = [f"resnet{d}" for d in DEPTHS] + list(TORCHVISION_NAMES)
    raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(known)} or package.module:function")


def build_backbone(architecture: dict[str, Any], num_classes: int, input_size: int = 32) -> StagedNetwork:
    family = architecture.get("family")
    if family == "cifar_resnet":
        return cifar_resnet(int(architecture.get("depth", 56)), num_classes)
    if family == "torchvision":
        name = str(architecture["name"])
        if name in RESNET_NAMES:
            return torchvision_resnet(name, num_classes, input_size)
        try:
            return torchvision_features(name, num_classes, input_size)
        except ValueError as exc:
            raise BackboneError(str(exc)) from exc
    if family == "custom":
        entry = str(architecture.get("entrypoint", ""))
        mod_name, _, fn_name = entry.partition(":")
        if not mod_name or not fn_name:
            raise BackboneError(f"custom entrypoint must look like package.module:function, got {entry!r}")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise BackboneError(f"cannot import custom backbone {entry!r}: {exc}") from exc
        net = fn(num_classes=num_classes, **architecture.get("kwargs", {}))
        if not isinstance(net, StagedNetwork):
            raise BackboneError(f"{entry} returned {type(net).__name__}, expected a StagedNetwork")
        return net
    raise BackboneError(f"unknown backbone family {family!r}")
