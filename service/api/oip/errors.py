"""Error bodies on the ``/v2`` paths as the Open Inference Protocol specifies them.

The protocol's error body is ``{"error": "<message>"}`` (clients such as ``tritonclient`` format that string
into their exception). Everything else in this service answers ``{"error": {"code": ..., "message": ...}}``;
this ASGI middleware rewrites an error response on a ``/v2`` path into
``{"error": "<message>", "code": "<stable code>", ...}`` (the envelope's other fields kept beside them) and adds
the header ``X-Classmeans-Error-Code``. Bad input answers 400, as the protocol says ("typically 400"): the
envelope's 415 (not an image) and 422 (validation) become 400 here; 404, 409, 413, 503 and 504 keep their
meaning. Errors from anywhere (a route, a dependency, the body-size cap, an unmatched path) are covered,
and success responses pass through untouched (one status check per response).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CODE_HEADER = "X-Classmeans-Error-Code"
STATUS_ON_V2 = {415: 400, 422: 400}


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def oip_error_body(body: Any) -> tuple[dict[str, Any], str] | None:
    """The protocol's body for one of our envelopes, and its code; None when ``body`` is not an envelope."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("code"), str):
        return None
    extra = {k: v for k, v in err.items() if k not in ("code", "message")}
    rest = {k: v for k, v in body.items() if k != "error"}
    return {"error": err["message"], "code": err["code"], **extra, **rest}, err["code"]


class OipErrorMiddleware:
    """Rewrite error envelopes on ``/v2`` paths into the protocol's error body (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_v2_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    await send(message)
                else:
                    start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_rewritten(send, start, b"".join(chunks))

        await self.app(scope, receive, capture)


async def _send_rewritten(send: Send, start: Message, body: bytes) -> None:
    status = int(start["status"])
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    try:
        converted = oip_error_body(json.loads(body))
    except ValueError:
        converted = None
    if converted is not None:
        new_body, code = converted
        body = json.dumps(new_body, ensure_ascii=False).encode("utf-8")
        status = STATUS_ON_V2.get(status, status)
        headers.append((CODE_HEADER.lower().encode("latin-1"), code.encode("latin-1", "replace")))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
