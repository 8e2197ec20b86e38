"""Open Inference Protocol v2 (KServe / Triton JSON): server and model metadata, readiness, infer.

``POST /v2/models/{m}/infer`` takes one input: ``BYTES`` with base64-encoded image files (shape ``[n]``),
or ``FP32`` with normalised pixels (shape ``[n, 3, H, W]`` or ``[3, H, W]``, row-major). Request
``parameters`` may hold ``profile``, ``exits`` (``"off"`` runs the full network), ``timeout`` (µs, as in
Triton) and ``top_k``. Outputs: ``label``, ``class_index``, ``confidence``, ``exit_layer``, ``flops``,
``probabilities``, ``rule``; an output requested with ``parameters.classification: k`` answers in the classification
extension's ``"score:index:label"`` strings. Response ``parameters`` name the bundle, profile and version,
and for a single sample also its ``exit_layer``, ``exit_name``, ``flops`` (IC costs included), ``confidence``,
``mode`` and ``rule`` (what let it out: ``cm``, ``ic``, ``ic+cm``, ``final``); for several samples ``rules``.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import __version__
from service.api import schemas
from service.api.deps import EngineDep, StateDep
from service.api.errors import ApiError
from service.api.inference import Payload, check_profile, classify_samples, deadline_for, decode_all, state_headers
from service.api.state import AppState
from service.serving.engine import Engine
from service.serving.snapshot import InferenceOutcome

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

OUTPUTS = ("label", "class_index", "confidence", "exit_layer", "flops", "probabilities", "rule")
ERRORS = {400: {"model": schemas.ErrorBody, "description": "invalid_input"},
          404: {"model": schemas.ErrorBody, "description": "model_not_found, profile_not_found"},
          413: {"model": schemas.ErrorBody, "description": "too_many_files, payload_too_large"},
          503: {"model": schemas.ErrorBody, "description": "overloaded, not_ready"}}


def _check_model(engine: Engine, model_name: str) -> None:
    if model_name != engine.spec.name:
        raise ApiError(404, "model_not_found", f"model {model_name!r} is not served here "
                       f"(this server serves {engine.spec.name!r})")


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_input", message)


@router.get("", response_model=schemas.ServerMetadata)
async def server_metadata() -> schemas.ServerMetadata:
    """Server name, version and protocol extensions."""
    return schemas.ServerMetadata(name="classmeans-serve", version=__version__, extensions=["classification"])


@router.get("/models/{model_name}", response_model=schemas.ModelMetadata, responses=ERRORS)
async def model_metadata(model_name: str, state: StateDep, engine: EngineDep) -> schemas.ModelMetadata:
    """Inputs, outputs, the serving bundle and the batching settings."""
    _check_model(engine, model_name)
    snap = engine.snapshot
    h, w = engine.spec.input_size
    s = state.settings
    return schemas.ModelMetadata(
        name=engine.spec.name, versions=[snap.bundle_id], platform="pytorch_classmeans",
        inputs=[schemas.TensorMeta(name="image", datatype="BYTES", shape=[-1]),
                schemas.TensorMeta(name="input", datatype="FP32", shape=[-1, 3, h, w])],
        outputs=[schemas.TensorMeta(name="label", datatype="BYTES", shape=[-1]),
                 schemas.TensorMeta(name="class_index", datatype="INT64", shape=[-1]),
                 schemas.TensorMeta(name="confidence", datatype="FP32", shape=[-1]),
                 schemas.TensorMeta(name="exit_layer", datatype="INT64", shape=[-1]),
                 schemas.TensorMeta(name="flops", datatype="FP64", shape=[-1]),
                 schemas.TensorMeta(name="probabilities", datatype="FP32", shape=[-1, engine.spec.num_classes]),
                 schemas.TensorMeta(name="rule", datatype="BYTES", shape=[-1])],
        parameters={"bundle": snap.bundle_id, "profile": snap.profile_name, "version": snap.version,
                    "classes": list(engine.spec.classes), "exit_names": list(snap.bundle.exit_names),
                    "num_layers": snap.bundle.num_exits, "flops_full": snap.bundle.costs.full,
                    "max_batch_size": s.max_batch_size, "max_delay_ms": s.max_delay_ms,
                    "max_files": s.max_files, "queue_size": s.queue_size,
                    "mean": list(engine.spec.mean), "std": list(engine.spec.std),
                    "internal_classifiers": engine.ic_store.info(snap.ic)})


@router.get("/models/{model_name}/ready", response_model=schemas.ModelReady, responses=ERRORS)
async def model_ready(model_name: str, engine: EngineDep) -> schemas.ModelReady:
    """200 when this model is ready (503 ``not_ready`` otherwise)."""
    _check_model(engine, model_name)
    return schemas.ModelReady(name=model_name, ready=True)


def _param(params: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    v = params.get(key)
    if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
        raise _bad(f"parameter {key!r} has the wrong type")
    return v


def _decode_b64(data: Any, n: int) -> list[tuple[str | None, bytes]]:
    if not isinstance(data, list) or len(data) != n or not all(isinstance(d, str) for d in data):
        raise _bad("a BYTES input needs one base64 string per element of its shape")
    out = []
    for i, d in enumerate(data):
        try:
            out.append((f"element {i}", base64.b64decode(d, validate=True)))
        except (binascii.Error, ValueError):
            raise _bad(f"element {i} of the BYTES input is not valid base64") from None
    return out


def _fp32(inp: schemas.InferInput, engine: Engine) -> torch.Tensor:
    h, w = engine.spec.input_size
    shape = list(inp.shape)
    if shape == [3, h, w]:
        shape = [1, 3, h, w]
    if len(shape) != 4 or shape[1:] != [3, h, w] or shape[0] < 1:
        raise _bad(f"an FP32 input must have shape [n, 3, {h}, {w}]")
    try:
        arr = np.asarray(inp.data, dtype=np.float32)
    except (TypeError, ValueError):
        raise _bad("the FP32 input data must be numbers") from None
    if arr.size != math.prod(shape):
        raise _bad(f"the FP32 input has {arr.size} values, its shape needs {math.prod(shape)}")
    if not np.isfinite(arr).all():
        raise _bad("the FP32 input has non-finite values")
    return torch.from_numpy(arr.reshape(shape).copy())


def _check_outputs(req: schemas.InferRequest) -> None:
    for o in req.outputs or []:
        if o.name not in OUTPUTS:
            raise _bad(f"unknown output {o.name!r} (have: {', '.join(OUTPUTS)})")
        top = (o.parameters or {}).get("classification")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
            raise _bad("parameters.classification must be a positive integer")


def _outputs(req: schemas.InferRequest, outcome: InferenceOutcome, engine: Engine) -> list[schemas.InferOutput]:
    preds = outcome.predictions
    n, k = len(preds), engine.spec.num_classes
    probs = np.zeros((n, k), dtype=np.float64)
    for i, p in enumerate(preds):
        for idx, _, pr in p.top_k:
            probs[i, idx] = pr
    tensors: dict[str, tuple[str, list[int], list[Any]]] = {
        "label": ("BYTES", [n], [p.label for p in preds]),
        "class_index": ("INT64", [n], [p.class_index for p in preds]),
        "confidence": ("FP32", [n], [p.confidence for p in preds]),
        "exit_layer": ("INT64", [n], [p.exit_index for p in preds]),
        "flops": ("FP64", [n], [p.flops for p in preds]),
        "probabilities": ("FP32", [n, k], probs.flatten().tolist()),
        "rule": ("BYTES", [n], [p.rule for p in preds]),
    }
    out = []
    for o in req.outputs or [schemas.InferRequestedOutput(name=name) for name in OUTPUTS]:
        top = (o.parameters or {}).get("classification")
        if top is not None:
            top = min(top, k)
            data = [f"{p.top_k[q][2]:.6f}:{p.top_k[q][0]}:{p.top_k[q][1]}" for p in preds for q in range(top)]
            out.append(schemas.InferOutput(name=o.name, datatype="BYTES", shape=[n, top], data=data))
            continue
        dt, shape, data = tensors[o.name]
        out.append(schemas.InferOutput(name=o.name, datatype=dt, shape=shape, data=data))
    return out


def _payload(state: AppState, engine: Engine, inp: schemas.InferInput, n: int) -> Payload:
    """The input's ``n`` samples, read after admission: base64 image files (BYTES) or normalised pixels (FP32)."""

    async def load() -> np.ndarray | torch.Tensor:
        if inp.datatype == "BYTES":
            return await decode_all(state, engine, _decode_b64(inp.data, n))
        if inp.datatype == "FP32":
            return _fp32(inp, engine)
        raise _bad(f"datatype {inp.datatype!r} is not accepted; use BYTES or FP32")

    return Payload(n, load)


@router.post("/models/{model_name}/infer", response_model=schemas.InferResponse, responses=ERRORS)
async def infer(model_name: str, body: schemas.InferRequest, state: StateDep, engine: EngineDep) -> JSONResponse:
    """Classify a BYTES (encoded images) or FP32 (normalised pixels) input."""
    _check_model(engine, model_name)
    snap = engine.snapshot
    params = body.parameters or {}
    profile = _param(params, "profile", (str,))
    exits = params.get("exits", "on")
    if exits not in ("on", "off", True, False):
        raise _bad("parameter 'exits' must be 'on' or 'off'")
    exits_off = exits in ("off", False)
    timeout_us = _param(params, "timeout", (int, float))
    deadline = deadline_for(state, timeout_us / 1e6 if timeout_us else None)
    if len(body.inputs) != 1:
        raise _bad("send exactly one input (BYTES images or an FP32 tensor)")
    inp = body.inputs[0]
    _check_outputs(body)
    check_profile(snap, profile)
    n = math.prod(inp.shape) if inp.datatype == "BYTES" else (inp.shape[0] if len(inp.shape) == 4 else 1)
    if n > state.settings.max_files:
        raise ApiError(413, "too_many_files", f"at most {state.settings.max_files} samples per request")
    if n < 1:
        raise _bad("the input is empty")
    done = await classify_samples(state, snap, _payload(state, engine, inp, n), deadline, profile, exits_off,
                                  engine.spec.num_classes)
    req, outcome = done.request, done.outcome
    preds = outcome.predictions
    full = snap.bundle.costs.full
    parameters: dict[str, Any] = {"bundle": snap.bundle_id, "profile": req.served_as, "version": snap.version,
                                  "num_layers": snap.bundle.num_exits, "flops_full": full}
    if len(preds) == 1:
        p = preds[0]
        parameters.update({"profile": p.profile, "exit_layer": p.exit_index, "exit_name": p.exit_name,
                           "flops": p.flops, "flops_fraction": p.flops / full, "confidence": p.confidence,
                           "mode": p.mode, "rule": p.rule})
        if p.profile != req.served_as:
            parameters["operating_point"] = req.served_as
    else:
        parameters["rules"] = [q.rule for q in preds]
    resp = schemas.InferResponse(model_name=engine.spec.name, model_version=snap.bundle_id, id=body.id,
                                 parameters=parameters, outputs=_outputs(body, outcome, engine))
    return JSONResponse(resp.model_dump(), headers=state_headers(snap, req.served_as))
