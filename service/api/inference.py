"""The one classify pipeline of the fast lane, ``POST /classify`` and v2 infer: check -> admit -> decode ->
predict (:func:`classify_samples`), then each protocol encodes the answer (:func:`classify_payload` for /classify).

A request names its samples as a :class:`Payload` (encoded image files, base64 strings, a tensor); the
pipeline checks the profile, admits the samples to the batcher's queue (a fast 503 when it is full), only
then decodes them (a small image on the event loop, larger ones in a thread), and waits for the batch.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import torch
from starlette.requests import Request

from service.api import schemas
from service.api.state import AppState
from service.errors import ProfileNotFound
from service.ingest.images import ImageError, decode_image
from service.serving.batcher import Submitted
from service.serving.engine import Engine
from service.serving.snapshot import InferenceOutcome, InferenceRequest, Snapshot
from service.serving.time_profiles import operating_ms


def check_profile(snapshot: Snapshot, profile: str | None) -> None:
    """404 ``profile_not_found`` for a per-request profile the serving bundle does not have."""
    if profile is not None and not snapshot.has_profile(profile):
        names = ", ".join(sorted(snapshot.profile_names()))
        raise ProfileNotFound(f"profile {profile!r} is not in bundle {snapshot.bundle_id} (have: {names})")


def admit(state: AppState, n: int) -> None:
    """Fast 503 before any decoding: ``overloaded`` when the queue cannot take ``n`` more samples (the batcher
    refuses and counts it); ``shed`` while the latency autopilot is on and ``n`` more samples could not be
    answered within its target (admission control, :mod:`service.serving.admission`; counted too)."""
    assert state.batcher is not None
    state.batcher.admit(n)
    if state.autopilot is not None:
        state.autopilot.admit(n)


# One small image (a CIFAR-sized PNG decodes in ~0.1 ms) is decoded on the event loop: handing it to a
# decode thread and back costs more CPU than the decode, and two thread wake-ups of latency. The pixel cap
# bounds the time the loop can spend on it (checked from the header before any pixel is decoded).
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 64 * 64


async def decode_all(state: AppState, engine: Engine, blobs: list[tuple[str | None, bytes]]) -> np.ndarray:
    """Decode every image into ``uint8 (n, H, W, 3)`` at the model's input size: one image of at most
    :data:`INLINE_DECODE_PIXELS` pixels on the loop, anything else in a worker thread."""
    size = engine.spec.preprocessing
    max_pixels = state.settings.max_image_pixels

    def work(cap: int = max_pixels) -> np.ndarray:
        arrays = []
        for i, (name, data) in enumerate(blobs):
            try:
                arrays.append(decode_image(data, size=size, max_pixels=cap))
            except ImageError as exc:
                if len(blobs) == 1 and name is None:
                    raise
                where = f"file {i}" + (f" ({name!r})" if name else "")
                raise ImageError(f"{where}: {exc}", code=exc.code) from None
        return np.stack(arrays)

    if len(blobs) == 1 and len(blobs[0][1]) <= INLINE_DECODE_BYTES:
        cap = min(max_pixels, INLINE_DECODE_PIXELS)
        try:
            return work(cap)
        except ImageError as exc:
            if exc.code != "image_too_large" or cap == max_pixels:
                raise
            # larger than the inline cap: decode it off the loop under the real limit
    return await anyio.to_thread.run_sync(work, limiter=state.decode_limiter)


def deadline_for(state: AppState, timeout_s: float | None = None) -> float:
    budget = state.settings.request_deadline_s
    if timeout_s is not None and timeout_s > 0:
        budget = min(budget, timeout_s)
    return time.monotonic() + budget


async def run_inference(state: AppState, req: InferenceRequest, deadline: float
                        ) -> tuple[InferenceOutcome, Submitted]:
    """Submit to the batcher (which counts its rejections by reason); they reach the error handlers."""
    assert state.batcher is not None
    sub = await state.batcher.submit(req, req.size, deadline)
    outcome = sub.result
    assert isinstance(outcome, InferenceOutcome)
    return outcome, sub


def operating_info(snapshot: Snapshot) -> schemas.Operating:
    op = snapshot.operating
    return schemas.Operating(name=op.name, a=op.a, b=op.b, lam=op.lam, flops_fraction=op.flops_fraction,
                             accuracy=op.accuracy, ms=operating_ms(snapshot.bundle, op))


def classify_payload(engine: Engine, done: Classified, filenames: list[str | None], t0: float) -> dict[str, Any]:
    """The ``ClassifyResponse`` body as plain JSON-able data (``t0``: when the request arrived).

    Built directly rather than through the pydantic models (their construction and ``model_dump`` cost
    more than the rest of the answer); a test checks it is exactly what ``schemas.ClassifyResponse`` gives.
    """
    req, outcome, sub = done.request, done.outcome, done.submitted
    snap = req.snapshot
    full = float(snap.bundle.costs.full)
    m = snap.bundle.num_exits
    preds = [{"filename": filenames[i] if i < len(filenames) else None, "label": p.label,
              "class_index": p.class_index, "confidence": float(p.confidence),
              "top_k": [{"index": i_, "label": l_, "probability": float(pr)} for i_, l_, pr in p.top_k],
              "exit_index": p.exit_index, "exit_name": p.exit_name, "num_exits": m, "flops": float(p.flops),
              "flops_full": full, "flops_fraction": p.flops / full, "profile": p.profile, "mode": p.mode,
              "rule": p.rule, "member": p.member}
             for i, p in enumerate(outcome.predictions)]
    mixed = req.profile is None and not req.exits_off and snap.operating.b is not None
    return {"model": engine.spec.name, "bundle": snap.bundle_id, "profile": req.served_as,
            "version": snap.version, "operating": operating_info(snap).model_dump() if mixed else None,
            "exits": "off" if req.exits_off else "on", "predictions": preds,
            "latency_seconds": time.perf_counter() - t0, "queue_seconds": float(sub.queue_seconds),
            "inference_seconds": float(outcome.inference_seconds), "batch_samples": sub.batch_samples}


def request_t0(request: Request) -> float:
    """When the request arrived (set by the metrics middleware), else now."""
    return request.scope.get("state", {}).get("t0", time.perf_counter())


async def classify_json(state: AppState, engine: Engine, snap: Snapshot, blobs: list[tuple[str | None, bytes]],
                        deadline: float, t0: float, profile: str | None = None, exits_off: bool = False,
                        top_k: int = 5, admitted: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """``POST /classify`` (the route and the fast lane): the pipeline on image files, then the answer's
    body and headers. ``admitted``: the caller already checked the profile and admitted the samples."""
    done = await classify_samples(state, snap, encoded_images(state, engine, blobs), deadline, profile,
                                  exits_off, top_k, admitted)
    body = classify_payload(engine, done, [name for name, _ in blobs], t0)
    return body, state_headers(snap, body["profile"])


def state_headers(snap: Snapshot, profile: str) -> dict[str, str]:
    """Response headers naming what served (handy for curl -i and load generators)."""
    return {"X-Classmeans-Bundle": snap.bundle_id, "X-Classmeans-Profile": profile,
            "X-Classmeans-Version": str(snap.version)}


@dataclass
class Payload:
    """The samples of one request: ``n`` of them, and how to turn them into model input after admission
    (uint8 ``pixels (n, H, W, 3)`` or a normalised ``tensor (n, 3, H, W)``)."""

    n: int
    load: Callable[[], Awaitable[np.ndarray | torch.Tensor]]


def encoded_images(state: AppState, engine: Engine, blobs: list[tuple[str | None, bytes]]) -> Payload:
    """Image files (``(filename or None, bytes)``), decoded under the model's input size and pixel cap."""
    return Payload(len(blobs), lambda: decode_all(state, engine, blobs))


@dataclass
class Classified:
    request: InferenceRequest
    outcome: InferenceOutcome
    submitted: Submitted


async def classify_samples(state: AppState, snap: Snapshot, payload: Payload, deadline: float,
                           profile: str | None = None, exits_off: bool = False, top_k: int = 5,
                           admitted: bool = False) -> Classified:
    """check the profile -> admit ``payload.n`` samples (fast 503) -> decode -> predict, under ``snap``
    (``admitted``: the first two were done by the caller, before it read the body)."""
    if not admitted:
        check_profile(snap, profile)
        admit(state, payload.n)
    data = await payload.load()
    if isinstance(data, torch.Tensor):
        req = InferenceRequest(snap, tensor=data, profile=profile, exits_off=exits_off, top_k=top_k)
    else:
        req = InferenceRequest(snap, pixels=data, profile=profile, exits_off=exits_off, top_k=top_k)
    outcome, sub = await run_inference(state, req, deadline)
    return Classified(req, outcome, sub)
