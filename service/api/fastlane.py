"""A lean ASGI lane for the hot request: ``POST /classify`` with one raw ``image/*`` body.

The same checks in the same order, the same answer and the same error envelope as the FastAPI route
(:mod:`service.api.routes.classify`: both call the one pipeline,
:func:`service.api.inference.classify_samples`), without FastAPI's per-request routing, dependency
solving, query validation and response-model construction: about a fifth of the server's CPU per request
at 32 clients (py-spy, docs/benchmarks.md).

Only the plain case takes this lane: a raw ``image/*`` body, a ready engine, and a query string whose
parameters (``profile``, ``top_k``, ``exits``) are each given at most once and well-formed. Everything else
(multipart, a malformed or unknown parameter, a server that is loading or draining) goes to the FastAPI
app unchanged, so FastAPI stays the single source of validation errors and of the OpenAPI schema.
The lane sits inside the metrics and body-limit middlewares, so both still see every request.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import handle_exception
from service.api.inference import admit, check_profile, classify_json, deadline_for, request_t0
from service.api.limits import read_body_capped
from service.api.routes.classify import DEFAULT_TOP_K, EXITS, MAX_PROFILE_NAME, MAX_TOP_K
from service.api.state import AppState

_TOP_K = re.compile(rf"[1-9][0-9]{{0,{len(str(MAX_TOP_K)) - 1}}}")  # digits only; the value is checked too
_PARAMS = frozenset({"profile", "top_k", "exits"})
Options = tuple[str | None, int, bool]


def plain_options(scope: Scope) -> Options | None:
    """``(profile, top_k, exits_off)`` when the request may take the lean lane, else None."""
    ctype = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            ctype = value
            break
    if not ctype.split(b";", 1)[0].strip().lower().startswith(b"image/"):
        return None
    profile: str | None = None
    top_k, exits = DEFAULT_TOP_K, EXITS[0]
    qs = scope.get("query_string", b"")
    if qs:
        pairs = parse_qsl(qs.decode("latin-1"), keep_blank_values=True)
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys) or not _PARAMS.issuperset(keys):
            return None
        for key, value in pairs:
            if key == "top_k":
                if not _TOP_K.fullmatch(value) or int(value) > MAX_TOP_K:
                    return None
                top_k = int(value)
            elif key == "exits":
                if value not in EXITS:
                    return None
                exits = value
            elif not 1 <= len(value) <= MAX_PROFILE_NAME:
                return None
            else:
                profile = value
    return profile, top_k, exits == EXITS[1]


class ClassifyFastLane:
    """ASGI middleware: serve plain raw-body ``POST /classify`` requests itself, pass on everything else."""

    def __init__(self, app: ASGIApp, state: AppState, route: Any = None) -> None:
        self.app = app
        self.state = state
        self.route = route  # the FastAPI route, so the metrics middleware labels the endpoint alike

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/classify" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        options = plain_options(scope)
        state = self.state
        if options is None or state.engine is None or state.batcher is None:
            await self.app(scope, receive, send)
            return
        if self.route is not None:
            scope["route"] = self.route
        request = Request(scope, receive)
        try:
            body, headers = await self._serve(request, *options)
        except Exception as exc:  # the route's exception handlers, same envelope and status
            response = await handle_exception(request, exc)
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()),
                                (b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def _serve(self, request: Request, profile: str | None, top_k: int, exits_off: bool
                     ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        state = self.state
        engine = state.engine
        assert engine is not None
        snap = engine.snapshot  # read once: this request is served by exactly this state
        deadline = deadline_for(state)
        admitted = state.autopilot is not None and state.autopilot.engaged
        if admitted:  # shedding: refuse before the body is even read (the same checks, in the same order)
            check_profile(snap, profile)
            admit(state, 1)
        data = await read_body_capped(request, state.settings.max_file_bytes)
        payload, named = await classify_json(state, engine, snap, [(None, data)], deadline, request_t0(request),
                                             profile, exits_off, top_k, admitted=admitted)
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("utf-8")
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in named.items()]
        return body, headers
