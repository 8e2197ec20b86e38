"""Open Inference Protocol v2 (KServe / Triton HTTP/REST): server and model metadata, readiness, model
configuration, statistics, infer; with the binary tensor extension both ways.

``POST /v2/models/{m}/infer`` takes one input: ``BYTES`` with encoded image files (shape ``[n]`` or ``[n, 1]``;
base64 strings in JSON, raw bytes in binary form), or ``FP32`` with normalised pixels (shape ``[n, 3, H, W]`` or
``[3, H, W]``, row-major). The body is JSON, with or without ``Content-Type: application/json`` (tritonclient
sends none); with the ``Inference-Header-Content-Length`` header it is a JSON header followed by the inputs'
raw bytes (:mod:`service.api.oip.binary`). Request ``parameters`` may hold ``profile``, ``exits`` (``"off"`` runs
the full network), ``timeout`` (µs, as in Triton) and ``binary_data_output``. Outputs: ``label``,
``class_index``, ``confidence``, ``exit_layer``, ``flops``, ``probabilities``, ``rule``; an output requested
with ``parameters.classification: k`` answers in the classification extension's ``"score:index:label"``
strings, one requested with ``parameters.binary_data: true`` comes back as raw bytes after the JSON.
Response ``parameters`` name the bundle, profile and version, and for a single sample also its
``exit_layer``, ``exit_name``, ``flops`` (IC costs included), ``confidence``, ``mode`` and ``rule`` (what let
it out: ``cm``, ``ic``, ``ic+cm``, ``final``); for several samples ``rules``.

Every model path also exists as ``/v2/models/{m}/versions/{version}/...``, where a version is a bundle id:
the active bundle answers, any other is 404 ``version_not_found``. Errors on these paths use the protocol's
body ``{"error": "<message>", "code": "<code>"}`` (:mod:`service.api.oip.errors`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service import __version__
from service.api import schemas
from service.api.deps import EngineDep, StateDep
from service.api.errors import ApiError
from service.api.inference import Payload, check_profile, classify_samples, deadline_for, decode_all, state_headers
from service.api.middleware import inference_route
from service.api.oip import binary, model_info, tensors
from service.api.state import AppState
from service.serving.engine import Engine
from service.serving.snapshot import InferenceOutcome, InferenceRequest, Snapshot

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics"]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.OipError, "description": "invalid_input, validation_error, not_an_image, ..."},
    404: {"model": schemas.OipError, "description": "model_not_found, version_not_found, profile_not_found"},
    413: {"model": schemas.OipError, "description": "too_many_files, payload_too_large, image_too_large"},
    503: {"model": schemas.OipError, "description": "overloaded, queue_timeout, not_ready"},
    504: {"model": schemas.OipError, "description": "deadline_exceeded"}}


def _inlined(schema: dict[str, Any]) -> Any:
    """A model's JSON schema with its ``$defs`` inlined (for a hand-written request body in the OpenAPI)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


INFER_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined(schemas.InferRequest.model_json_schema())},
    # the binary tensor extension: a JSON header of Inference-Header-Content-Length bytes, then the raw tensors
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {**ERRORS, 200: {"content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "description": "JSON, or (binary outputs) a JSON header of Inference-Header-Content-Length bytes, "
                   "then the outputs' raw bytes"}}


def _served(engine: Engine, model_name: str, version: str | None) -> Snapshot:
    """The snapshot that answers for ``model_name`` (and ``version``, a bundle id); 404 otherwise."""
    if model_name != engine.spec.name:
        raise ApiError(404, "model_not_found", f"model {model_name!r} is not served here "
                       f"(this server serves {engine.spec.name!r})")
    snap = engine.snapshot  # read once: the version check and the answer use the same state
    if version is not None and version != snap.bundle_id:
        raise ApiError(404, "version_not_found", f"version {version!r} of model {model_name!r} is not served: "
                       f"versions are bundle ids and bundle {snap.bundle_id} serves now (activate another "
                       "with POST /admin/bundles/{id}/activate)")
    return snap


@router.get("", response_model=schemas.ServerMetadata)
async def server_metadata() -> schemas.ServerMetadata:
    """Server name, version and protocol extensions."""
    return schemas.ServerMetadata(name="classmeans-serve", version=__version__, extensions=EXTENSIONS)


@router.get("/models/stats", responses=ERRORS)
async def all_model_stats(state: StateDep, engine: EngineDep) -> JSONResponse:
    """Triton's statistics extension for every model (this server serves one)."""
    return JSONResponse(model_info.model_stats(engine, state.metrics))


def _metadata(state: AppState, engine: Engine, snap: Snapshot) -> schemas.ModelMetadata:
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
                    "internal_classifiers": engine.ic_store.info(snap.ic),
                    "engine": snap.catalog.engine_state()})


@router.get("/models/{model_name}", response_model=schemas.ModelMetadata, responses=ERRORS)
async def model_metadata(model_name: str, state: StateDep, engine: EngineDep) -> schemas.ModelMetadata:
    """Inputs, outputs, the serving bundle and the batching settings."""
    return _metadata(state, engine, _served(engine, model_name, None))


@router.get("/models/{model_name}/versions/{version}", response_model=schemas.ModelMetadata, responses=ERRORS)
async def model_version_metadata(model_name: str, version: str, state: StateDep, engine: EngineDep
                                 ) -> schemas.ModelMetadata:
    """Model metadata of one version (a bundle id; only the active bundle is served)."""
    return _metadata(state, engine, _served(engine, model_name, version))


@router.get("/models/{model_name}/ready", response_model=schemas.ModelReady, responses=ERRORS)
async def model_ready(model_name: str, engine: EngineDep) -> schemas.ModelReady:
    """200 when this model is ready (503 ``not_ready`` otherwise)."""
    _served(engine, model_name, None)
    return schemas.ModelReady(name=model_name, ready=True)


@router.get("/models/{model_name}/versions/{version}/ready", response_model=schemas.ModelReady, responses=ERRORS)
async def model_version_ready(model_name: str, version: str, engine: EngineDep) -> schemas.ModelReady:
    """200 when this version (the active bundle) is ready."""
    _served(engine, model_name, version)
    return schemas.ModelReady(name=model_name, ready=True)


@router.get("/models/{model_name}/config", responses=ERRORS)
async def model_config(model_name: str, state: StateDep, engine: EngineDep) -> JSONResponse:
    """Triton's model configuration extension: batching, inputs and outputs (JSON form of config.pbtxt)."""
    _served(engine, model_name, None)
    return JSONResponse(model_info.model_config(engine, state.settings))


@router.get("/models/{model_name}/versions/{version}/config", responses=ERRORS)
async def model_version_config(model_name: str, version: str, state: StateDep, engine: EngineDep) -> JSONResponse:
    """Model configuration of one version (the active bundle)."""
    _served(engine, model_name, version)
    return JSONResponse(model_info.model_config(engine, state.settings))


@router.get("/models/{model_name}/stats", responses=ERRORS)
async def model_stats(model_name: str, state: StateDep, engine: EngineDep) -> JSONResponse:
    """Triton's statistics extension: requests, samples, batches, queue and compute time, samples per exit."""
    _served(engine, model_name, None)
    return JSONResponse(model_info.model_stats(engine, state.metrics))


@router.get("/models/{model_name}/versions/{version}/stats", responses=ERRORS)
async def model_version_stats(model_name: str, version: str, state: StateDep, engine: EngineDep) -> JSONResponse:
    """Statistics of one version (the active bundle)."""
    _served(engine, model_name, version)
    return JSONResponse(model_info.model_stats(engine, state.metrics))


@router.post("/models/{model_name}/infer", response_model=schemas.InferResponse, responses=INFER_RESPONSES,
             openapi_extra=INFER_DOC)
@inference_route
async def infer(model_name: str, request: Request, state: StateDep, engine: EngineDep) -> Response:
    """Classify a BYTES (encoded images) or FP32 (normalised pixels) input."""
    return await _infer(request, state, engine, _served(engine, model_name, None))


@router.post("/models/{model_name}/versions/{version}/infer", response_model=schemas.InferResponse,
             responses=INFER_RESPONSES, openapi_extra=INFER_DOC)
async def infer_version(model_name: str, version: str, request: Request, state: StateDep, engine: EngineDep
                        ) -> Response:
    """Infer on one version (a bundle id; only the active bundle is served)."""
    return await _infer(request, state, engine, _served(engine, model_name, version))


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_input", message)


def _request_model(header: dict[str, Any]) -> schemas.InferRequest:
    try:
        return schemas.InferRequest.model_validate(header)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise ApiError(400, "validation_error", "; ".join(parts) or "invalid inference request") from None


def _options(params: dict[str, Any]) -> tuple[str | None, bool, float | None]:
    """``(profile, exits_off, timeout_s)`` from the request parameters."""
    profile, exits, timeout = params.get("profile"), params.get("exits", "on"), params.get("timeout")
    if profile is not None and not isinstance(profile, str):
        raise _bad("parameter 'profile' must be a string")
    if exits not in ("on", "off", True, False):
        raise _bad("parameter 'exits' must be 'on' or 'off'")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise _bad("parameter 'timeout' must be a number of microseconds")
    return profile, exits in ("off", False), timeout / 1e6 if timeout else None


async def _infer(request: Request, state: AppState, engine: Engine, snap: Snapshot) -> Response:
    try:
        raw_body = binary.decompress(await request.body(), request.headers.get("content-encoding"),
                                     state.settings.max_body_bytes)
        parsed = binary.split_body(raw_body, request.headers.get(binary.HEADER_LENGTH))
        body = _request_model(parsed.header)
        params = body.parameters or {}
        profile, exits_off, timeout_s = _options(params)
        deadline = deadline_for(state, timeout_s)
        if len(body.inputs) != 1:
            raise _bad("send exactly one input (BYTES images or an FP32 tensor)")
        inp = body.inputs[0]
        tensors.check_outputs(body.outputs)
        check_profile(snap, profile)
        n = tensors.sample_count(inp, engine.spec.input_size)
        if n > state.settings.max_files:
            raise ApiError(413, "too_many_files", f"at most {state.settings.max_files} samples per request")
        if n < 1:
            raise _bad("the input is empty")
        req, outcome = await _classify(state, engine, snap, inp, parsed.binary.get(0), n,
                                       profile, exits_off, deadline)
    except binary.OipInputError as exc:  # its own code and status (400, 413): the envelope, no traceback chain
        raise exc from None
    payload = _response(body, req, outcome, engine)
    content, head = binary.encode_response(payload, tensors.binary_outputs(body.outputs, params))
    headers = state_headers(snap, req.served_as)
    if head is None:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(head)
    return Response(content, media_type="application/octet-stream", headers=headers)


async def _classify(state: AppState, engine: Engine, snap: Snapshot, inp: schemas.InferInput, raw: bytes | None,
                    n: int, profile: str | None, exits_off: bool, deadline: float
                    ) -> tuple[InferenceRequest, InferenceOutcome]:
    """The one call into the shared classify pipeline (check, admit, decode, batch, run); the input's samples
    are read only once admitted: image files (BYTES) or normalised pixels (FP32)."""

    async def load() -> np.ndarray | torch.Tensor:
        if inp.datatype == "BYTES":
            return await decode_all(state, engine, tensors.image_blobs(inp, raw, n))
        return tensors.fp32_batch(inp, raw, n)

    done = await classify_samples(state, snap, Payload(n, load), deadline, profile, exits_off,
                                  engine.spec.num_classes)
    return done.request, done.outcome


def _response(body: schemas.InferRequest, req: InferenceRequest, outcome: InferenceOutcome, engine: Engine
              ) -> dict[str, Any]:
    snap = req.snapshot
    preds = outcome.predictions
    m = snap.bundle.num_exits
    full = float(snap.bundle.costs.full)
    rules = [p.rule for p in preds]
    parameters: dict[str, Any] = {"bundle": snap.bundle_id, "profile": req.served_as, "version": snap.version,
                                  "num_layers": m, "flops_full": full}
    if len(preds) == 1:
        p = preds[0]
        parameters.update({"profile": p.profile, "exit_layer": p.exit_index, "exit_name": p.exit_name,
                           "flops": float(p.flops), "flops_fraction": float(p.flops) / full,
                           "confidence": float(p.confidence),
                           "mode": p.mode, "rule": rules[0]})
        if p.member is not None:
            parameters["member"] = p.member
        if p.profile != req.served_as:
            parameters["operating_point"] = req.served_as
    else:
        parameters["rules"] = rules
    return {"model_name": engine.spec.name, "model_version": snap.bundle_id, "id": body.id,
            "parameters": parameters,
            "outputs": tensors.output_tensors(body.outputs, preds, engine.spec.num_classes, rules)}
