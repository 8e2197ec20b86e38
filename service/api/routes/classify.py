"""``POST /classify``: one or more images (multipart ``file`` parts or a raw ``image/*`` body)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.api import schemas
from service.api.deps import EngineDep, StateDep
from service.api.errors import ApiError
from service.api.forms import parse_multipart, read_upload
from service.api.inference import classify_json, deadline_for, request_t0
from service.api.limits import read_body_capped
from service.api.middleware import inference_route

router = APIRouter(tags=["data plane"])

# The route's limits, shared with the lean lane (service/api/fastlane.py), which must accept exactly these.
DEFAULT_TOP_K, MAX_TOP_K = 5, 1000
MAX_PROFILE_NAME = 200
EXITS = ("on", "off")

ERRORS = {400: {"model": schemas.ErrorBody, "description": "empty_image, invalid_form"},
          404: {"model": schemas.ErrorBody, "description": "profile_not_found"},
          413: {"model": schemas.ErrorBody, "description": "payload_too_large, too_many_files, image_too_large"},
          415: {"model": schemas.ErrorBody,
                "description": "unsupported_media_type, not_an_image, unsupported_image_format"},
          422: {"model": schemas.ErrorBody, "description": "validation_error, truncated_image, invalid_image"},
          503: {"model": schemas.ErrorBody, "description": "overloaded, queue_timeout, not_ready (Retry-After)"},
          504: {"model": schemas.ErrorBody, "description": "deadline_exceeded"}}


def _form_options(fields: dict[str, str], profile: str | None, top_k: int, exits: str
                  ) -> tuple[str | None, int, str]:
    """Multipart fields ``profile``, ``top_k``, ``exits`` override the query parameters."""
    profile = fields.get("profile", profile) or None
    if "top_k" in fields:
        try:
            top_k = int(fields["top_k"])
        except ValueError:
            raise ApiError(422, "validation_error", "top_k must be an integer") from None
    exits = fields.get("exits", exits)
    if not 1 <= top_k <= MAX_TOP_K:
        raise ApiError(422, "validation_error", f"top_k must be between 1 and {MAX_TOP_K}")
    if exits not in EXITS:
        raise ApiError(422, "validation_error", "exits must be 'on' or 'off'")
    return profile, top_k, exits


@router.post("/classify", response_model=schemas.ClassifyResponse, responses=ERRORS)
@inference_route
async def classify(
    request: Request,
    state: StateDep,
    engine: EngineDep,
    profile: Annotated[str | None, Query(max_length=MAX_PROFILE_NAME, description="per-request profile override")
                       ] = None,
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="class probabilities to return per image")
                     ] = DEFAULT_TOP_K,
    exits: Annotated[Literal["on", "off"], Query(description="'off' runs the full network")] = "on",
) -> JSONResponse:
    """Classify images; each leaves the network at its own exit."""
    snap = engine.snapshot  # read once: this request is served by exactly this state
    deadline = deadline_for(state)
    settings = state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await parse_multipart(request, settings.max_files, ("file", "files"))
        try:
            profile, top_k, exits = _form_options(form.fields, profile, top_k, exits)
            if not form.files:
                raise ApiError(422, "validation_error", "no 'file' part in the multipart body")
            blobs = [(f.filename, await read_upload(f, settings.max_file_bytes, i)) for i, f in enumerate(form.files)]
        finally:
            await form.close()
    elif ctype.startswith("image/"):
        blobs = [(None, await read_body_capped(request, settings.max_file_bytes))]
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data with 'file' parts, or one image as a raw image/* body")
    body, headers = await classify_json(state, engine, snap, blobs, deadline, request_t0(request), profile,
                                        exits == "off", top_k)
    return JSONResponse(body, headers=headers)
