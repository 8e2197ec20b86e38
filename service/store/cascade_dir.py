"""``model_store/<cascade>/``: a cascade of the store's models, served like one model.

``model.json`` names its members (sibling model directories, in order) under ``architecture``::

    {"name": "cifar10-cascade", "architecture": {"family": "cascade",
     "members": ["cifar10-resnet20", "cifar10-resnet56"]}, "classes": [...], "input": {...},
     "weights": null, "weights_sha256": "<sha256 of the members' weight digests>",
     "extra": {"members": [{"name": ..., "weights_sha256": ..., "training_data": {...}}, ...]}}

There is no weights file: the members' own ``weights.safetensors`` are loaded (and checked against their own
``model.json``). ``weights_sha256`` is a digest of the members' digests, so a cascade bundle carries the same
provenance check as a single model's: change a member's weights and the cascade's bundles refuse to load.
The cascade's bundles, ``active.json``, jobs and locks live in its own directory, as for one model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

from service.backbones.cascade_network import CascadeMember, CascadeNetwork
from service.errors import ServiceError
from service.store.atomic import write_json_atomic
from service.store.model_dir import MODEL_FILE, ModelDirError, ModelSpec, read_spec

FAMILY = "cascade"


class CascadeError(ServiceError, ValueError):
    """A cascade that cannot be made or loaded: unknown members, other classes, other input geometry."""

    code = "invalid_cascade"
    status = 422
    STATUS_BY_CODE: ClassVar[dict[str, int]] = {"model_exists": 409, "model_not_found": 404}


def is_cascade(spec: ModelSpec) -> bool:
    return str(spec.architecture.get("family", "")) == FAMILY


def member_names(spec: ModelSpec) -> list[str]:
    members = spec.architecture.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) for m in members):
        raise ModelDirError(f"cascade {spec.name}: architecture.members must list at least two model names")
    return list(members)


def combined_digest(digests: list[str]) -> str:
    """The cascade's ``weights_sha256``: sha256 over the members' digests in order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _first_difference(a: ModelSpec, b: ModelSpec) -> str | None:
    if list(a.classes) == list(b.classes):
        return None
    if len(a.classes) != len(b.classes):
        return f"{a.name} has {len(a.classes)} classes, {b.name} has {len(b.classes)}"
    k = next(i for i, (x, y) in enumerate(zip(a.classes, b.classes, strict=True)) if x != y)
    return f"class {k} is {a.classes[k]!r} in {a.name} but {b.classes[k]!r} in {b.name}"


def check_members(specs: list[ModelSpec]) -> None:
    """Raise :class:`CascadeError` naming the first difference in classes or input geometry."""
    if len(specs) < 2:
        raise CascadeError("a cascade needs at least two members")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise CascadeError(f"a member appears twice: {names}")
    first = specs[0]
    for s in specs[1:]:
        if is_cascade(s):
            raise CascadeError(f"{s.name} is itself a cascade; list its members instead")
        diff = _first_difference(first, s)
        if diff:
            raise CascadeError(f"cascade members must have the same classes: {diff}", code="cascade_class_mismatch")
        if tuple(s.input_size) != tuple(first.input_size) or s.preprocessing != first.preprocessing:
            raise CascadeError(f"cascade members must see the same image: {first.name} takes "
                               f"{first.preprocessing.describe()}, {s.name} {s.preprocessing.describe()}",
                               code="cascade_input_mismatch")
    if is_cascade(first):
        raise CascadeError(f"{first.name} is itself a cascade; list its members instead")


def cascade_spec(name: str, specs: list[ModelSpec]) -> ModelSpec:
    """The ``model.json`` of a cascade of ``specs`` (checked)."""
    check_members(specs)
    first = specs[0]
    members: list[dict[str, Any]] = [{"name": s.name, "weights_sha256": s.weights_sha256,
                                      **({"training_data": s.extra["training_data"]}
                                         if "training_data" in s.extra else {})} for s in specs]
    return ModelSpec(name=name, architecture={"family": FAMILY, "members": [s.name for s in specs]},
                     classes=list(first.classes), input_size=tuple(first.input_size), mean=tuple(first.mean),
                     std=tuple(first.std), weights_sha256=combined_digest([s.weights_sha256 for s in specs]),
                     extra={"members": members}, resize=dict(first.resize))


def create_cascade(store: Path, name: str, members: list[str], replace: bool = False) -> ModelSpec:
    """Write ``store/<name>/model.json`` for a cascade of the store's ``members`` (in order)."""
    store = Path(store)
    if not name or "/" in name or name.startswith("."):
        raise CascadeError(f"invalid cascade name {name!r}")
    specs = []
    for m in members:
        if not (store / m / MODEL_FILE).is_file():
            raise CascadeError(f"model {m!r} is not in the store {store}", code="model_not_found")
        specs.append(read_spec(store / m))
    if name in members:
        raise CascadeError(f"the cascade cannot be named like its member {name!r}")
    spec = cascade_spec(name, specs)
    target = store / name
    if (target / MODEL_FILE).is_file() and not replace:
        raise CascadeError(f"{target} already exists", code="model_exists")
    target.mkdir(parents=True, exist_ok=True)
    obj = spec.to_json()
    obj["weights"] = None
    write_json_atomic(target / MODEL_FILE, obj)
    return spec


def load_cascade(model_dir: Path, spec: ModelSpec, verify_checksum: bool = True) -> CascadeNetwork:
    """Load every member (from the sibling directories) and check they are still what the cascade was made of."""
    from service.store.model_dir import load_model  # the members are plain models

    model_dir = Path(model_dir)
    members, specs = [], []
    for name in member_names(spec):
        path = model_dir.parent / name
        if not (path / MODEL_FILE).is_file():
            raise ModelDirError(f"cascade {spec.name}: member {name!r} is not in {model_dir.parent}")
        mspec, net = load_model(path, verify_checksum)
        if isinstance(net, CascadeNetwork):
            raise ModelDirError(f"cascade {spec.name}: member {name} is itself a cascade")
        specs.append(mspec)
        members.append(CascadeMember(name, net, tuple(mspec.mean), tuple(mspec.std)))
    try:
        check_members(specs)
    except CascadeError as exc:
        raise ModelDirError(f"cascade {spec.name}: {exc}") from exc
    if list(specs[0].classes) != list(spec.classes):
        raise ModelDirError(f"cascade {spec.name}: its classes differ from its members'")
    digest = combined_digest([s.weights_sha256 for s in specs])
    if spec.weights_sha256 and digest != spec.weights_sha256:
        changed = [s.name for s, rec in zip(specs, spec.extra.get("members", []), strict=False)
                   if rec.get("weights_sha256") != s.weights_sha256]
        raise ModelDirError(f"cascade {spec.name}: member weights changed since it was made ({', '.join(changed)}); "
                            "make it again (`classmeans cascade create --replace`) and calibrate it")
    return CascadeNetwork(members).eval()
