"""From a validated v2 input (JSON ``data`` or binary bytes) to what the engine takes: encoded images or a
normalised ``FP32`` batch; and from a finished inference to the v2 output tensors.

Inputs: ``BYTES`` of shape ``[n]`` or ``[n, 1]``, one encoded image per element (base64 strings in JSON,
raw bytes in binary form); ``FP32`` of shape ``[n, 3, H, W]`` or ``[3, H, W]`` (NCHW, normalised pixels).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import torch

from service.api import schemas
from service.api.oip.binary import OipInputError, bytes_elements, check_datatype, element_count, numeric_array
from service.serving.snapshot import SamplePrediction

OUTPUTS = ("label", "class_index", "confidence", "exit_layer", "flops", "probabilities", "rule")
ACCEPTED = ("BYTES", "FP32")


def sample_count(inp: schemas.InferInput, input_size: tuple[int, int]) -> int:
    """Samples in this input (checked before anything is decoded)."""
    check_datatype(inp.datatype)
    if inp.datatype not in ACCEPTED:
        raise OipInputError(f"datatype {inp.datatype} is not accepted; use BYTES (encoded images) or FP32 "
                            "(normalised NCHW pixels)")
    count = element_count(inp.shape)
    if inp.datatype == "BYTES":
        if len(inp.shape) not in (1, 2) or (len(inp.shape) == 2 and inp.shape[1] != 1):
            raise OipInputError(f"a BYTES input has shape [n] or [n, 1] (one encoded image per element), "
                                f"got {inp.shape}")
        return count
    h, w = input_size
    shape = [1, *inp.shape] if len(inp.shape) == 3 else inp.shape
    if len(shape) != 4 or shape[1:] != [3, h, w]:
        raise OipInputError(f"an FP32 input must have shape [n, 3, {h}, {w}] or [3, {h}, {w}] (NCHW), "
                            f"got {inp.shape}")
    return shape[0]


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise OipInputError("the input's 'data' must be a list (or give parameters.binary_data_size)")
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item) if isinstance(item, list) else [item])
    return out


def image_blobs(inp: schemas.InferInput, raw: bytes | None, n: int) -> list[tuple[str | None, bytes]]:
    """The encoded images of a ``BYTES`` input, named ``element i`` for error messages."""
    if raw is not None:
        items = bytes_elements(raw, n)
    else:
        flat = _flat(inp.data)
        if len(flat) != n or not all(isinstance(d, str) for d in flat):
            raise OipInputError(f"a BYTES input of shape {inp.shape} needs {n} base64 strings in 'data' "
                                "(or the images in binary form)")
        items = []
        for i, d in enumerate(flat):
            try:
                items.append(base64.b64decode(d, validate=True))
            except (binascii.Error, ValueError):
                raise OipInputError(f"element {i} of the BYTES input is not valid base64") from None
    for i, item in enumerate(items):
        if not item:
            raise OipInputError(f"element {i} of the BYTES input is empty")
    return [(f"element {i}", item) for i, item in enumerate(items)]


def fp32_batch(inp: schemas.InferInput, raw: bytes | None, n: int) -> torch.Tensor:
    """The ``FP32`` input as a ``(n, 3, H, W)`` tensor of finite values."""
    shape = [n, *inp.shape[-3:]]
    if raw is not None:
        arr = numeric_array(raw, "FP32", list(inp.shape)).reshape(shape)
    else:
        try:
            arr = np.asarray(_flat(inp.data), dtype=np.float32)
        except (TypeError, ValueError):
            raise OipInputError("the FP32 input data must be numbers") from None
        if arr.size != element_count(shape):
            raise OipInputError(f"the FP32 input has {arr.size} values, its shape {inp.shape} needs "
                                f"{element_count(shape)}")
        arr = arr.reshape(shape)
    if not np.isfinite(arr).all():
        raise OipInputError("the FP32 input has non-finite values")
    return torch.from_numpy(np.ascontiguousarray(arr))


def check_outputs(requested: list[schemas.InferRequestedOutput] | None) -> None:
    for o in requested or []:
        if o.name not in OUTPUTS:
            raise OipInputError(f"unknown output {o.name!r} (have: {', '.join(OUTPUTS)})")
        params = o.parameters or {}
        top = params.get("classification")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
            raise OipInputError("parameters.classification must be a positive integer")
        if not isinstance(params.get("binary_data", False), bool):
            raise OipInputError("parameters.binary_data must be true or false")
        if "shared_memory_region" in params:
            raise OipInputError(f"output {o.name!r}: shared-memory outputs are not supported")


def output_tensors(requested: list[schemas.InferRequestedOutput] | None, preds: list[SamplePrediction],
                   num_classes: int, rules: list[str]) -> list[dict[str, Any]]:
    """The output tensors as plain JSON-able dicts, in the requested order (all of :data:`OUTPUTS` by default)."""
    n, k = len(preds), num_classes
    probs = np.zeros((n, k), dtype=np.float64)
    for i, p in enumerate(preds):
        for idx, _, pr in p.top_k:
            probs[i, idx] = pr
    tensors: dict[str, tuple[str, list[int], list[Any]]] = {
        "label": ("BYTES", [n], [p.label for p in preds]),
        "class_index": ("INT64", [n], [p.class_index for p in preds]),
        "confidence": ("FP32", [n], [float(p.confidence) for p in preds]),
        "exit_layer": ("INT64", [n], [p.exit_index for p in preds]),
        "flops": ("FP64", [n], [float(p.flops) for p in preds]),
        "probabilities": ("FP32", [n, k], probs.flatten().tolist()),
        "rule": ("BYTES", [n], rules),
    }
    out = []
    for o in requested or [schemas.InferRequestedOutput(name=name) for name in OUTPUTS]:
        top = (o.parameters or {}).get("classification")
        if top is not None:
            top = min(top, k)
            data = [f"{p.top_k[q][2]:.6f}:{p.top_k[q][0]}:{p.top_k[q][1]}" for p in preds for q in range(top)]
            out.append({"name": o.name, "datatype": "BYTES", "shape": [n, top], "data": data})
            continue
        dt, shape, data = tensors[o.name]
        out.append({"name": o.name, "datatype": dt, "shape": shape, "data": data})
    return out


def binary_outputs(requested: list[schemas.InferRequestedOutput] | None, parameters: dict[str, Any]) -> set[str]:
    """Outputs to send in binary form: each requested output's ``binary_data``, defaulting to the request's
    ``binary_data_output`` (which, with no outputs requested, covers all of them: how tritonclient asks)."""
    default = parameters.get("binary_data_output") is True
    if not requested:
        return set(OUTPUTS) if default else set()
    return {o.name for o in requested if (o.parameters or {}).get("binary_data", default) is True}
