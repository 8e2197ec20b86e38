"""Read a user's checkpoint without running its code, and fit it to a staged network with clear errors.

Accepted: ``.safetensors``, or a ``torch.save`` file (``.pt``, ``.pth``, ``.th``, ``.bin``, ``.ckpt``) read with
``torch.load(weights_only=True)``: tensors, dicts, lists and numbers only, no code. The state dict may be the
file itself or nested under ``state_dict`` / ``model_state_dict`` / ``model`` (as training scripts save it);
``module.`` (DataParallel / DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes are removed.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from service.errors import ServiceError

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt", ".tar")
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
SHOWN = 6


class CheckpointError(ServiceError, ValueError):
    """The checkpoint cannot be read, or does not fit the architecture: the message says why and what to do.
    Codes: ``invalid_checkpoint`` (422), ``not_found`` (404), ``exists`` (an output folder in the way, 409)."""

    code, status = "invalid_checkpoint", 422
    STATUS_BY_CODE: ClassVar[dict[str, int]] = {"not_found": 404, "exists": 409}

    def __init__(self, message: str, code: str = "invalid_checkpoint") -> None:
        super().__init__(message, code)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` (CPU tensors), unwrapped and with training-wrapper prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found", code="not_found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path.name} as safetensors: {exc}") from exc
    elif suffix in TORCH_SUFFIXES:
        obj = _torch_load(path)
    else:
        raise CheckpointError(f"{path.name}: expected .safetensors or a torch.save file "
                              f"({', '.join(TORCH_SUFFIXES)})", code="unsupported_checkpoint")
    return strip_prefixes(unwrap_state_dict(obj, path.name))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = f"it names {found.group(1)}" if found else str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{path.name} is a pickle that needs code to load ({detail}). torch.load(weights_only=True) "
            "refuses to run code from a file, and so does this importer. In your own trusted Python, load the "
            "model and save only its weights: torch.save(model.state_dict(), 'weights.pt') (or "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')), then import that file.",
            code="checkpoint_needs_code") from exc
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"cannot read {path.name} with torch.load: {exc}") from exc


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """``obj`` itself when it maps names to tensors, else its ``state_dict``/``model_state_dict``/``model`` entry."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names "
                              "to tensors)")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    for key in NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return unwrap_state_dict(inner, f"{source}[{key!r}]")
    odd = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    raise CheckpointError(f"{source} is not a state dict: no tensors under any of {', '.join(NESTED_KEYS)}; "
                          f"non-tensor entries: {_listing(odd)}")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` wherever they lead a key (wrappers may nest)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def classifier_name(module: nn.Module) -> str | None:
    """The last ``nn.Linear`` in registration order: the layer whose outputs are the classes."""
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = name
    return last


def fit_state_dict(module: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> None:
    """Load ``state`` into ``module`` strictly, or raise naming the class count, the layers or the keys at fault.

    ``num_batches_tracked`` buffers (absent from older checkpoints, unused in eval mode) keep the module's value.
    Floating tensors are cast to the module's dtype (a float16 checkpoint loads into a float32 network).
    """
    expected = module.state_dict()
    head = classifier_name(module)
    head_w = f"{head}.weight" if head else None
    if head_w in state and head_w in expected and state[head_w].ndim == 2 \
            and state[head_w].shape[0] != expected[head_w].shape[0]:
        raise CheckpointError(f"the checkpoint's classifier {head!r} has {state[head_w].shape[0]} outputs, but "
                              f"{num_classes} classes were given: pass exactly the classes it was trained on, "
                              "in its order", code="class_count_mismatch")
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = " Is it a checkpoint of a different architecture?" if missing and unexpected else ""
        parts = ([f"missing {len(missing)} key(s): {_listing(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"the checkpoint does not fit the architecture: {'; '.join(parts)}.{hint}",
                              code="checkpoint_key_mismatch")
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        layer = shapes[0].split(":")[0].rsplit(".", 1)[0]
        raise CheckpointError(f"shape mismatch in layer {layer!r}: {_listing(shapes)}",
                              code="checkpoint_shape_mismatch")
    full = {k: (state[k].to(v.dtype) if k in state and v.is_floating_point() else state.get(k, v))
            for k, v in expected.items()}
    module.load_state_dict(full, strict=True)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
