"""Byte caps enforced before parsing: a body-size ASGI middleware and capped body readers.

The middleware refuses a declared ``Content-Length`` over the route's cap with 413 at once, without reading
the body, and counts the bytes of a chunked body as they arrive, raising 413 the moment the cap is passed.
The readers stream ``request.stream()`` (never ``request.body()`` for uploads) into memory or an anonymous
temporary file under their own cap.
"""

from __future__ import annotations

import json
import tempfile
from typing import IO

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, envelope, payload_too_large

_FLUSH = 1 << 20


class BodyLimitMiddleware:
    """Cap request bodies: ``limits`` maps exact paths to their cap, everything else gets ``default``."""

    def __init__(self, app: ASGIApp, default: int, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = default
        self.limits = dict(limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = _content_length(scope)
        if declared == -1:
            await _send_error(send, 400, "bad_request", "invalid Content-Length header")
            return
        if declared is not None and declared > limit:
            await _send_error(send, 413, "payload_too_large",
                              f"the request body ({declared} bytes) is larger than the limit of {limit} bytes")
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise payload_too_large(limit)
            return message

        await self.app(scope, capped_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length, None when absent, -1 when malformed."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(envelope(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def read_body_capped(request: Request, limit: int, what: str = "image") -> bytes:
    """The whole body in memory, refusing (413) as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit, what)
        chunks.append(chunk)
    return b"".join(chunks)


async def stream_to_tempfile(request: Request, limit: int) -> IO[bytes]:
    """Stream the body into an anonymous temporary file (gone when closed), refusing (413) past ``limit``.

    The caller closes the file. Writes happen in a worker thread, a megabyte at a time.
    """
    fh = tempfile.TemporaryFile(prefix="classmeans-upload-")  # noqa: SIM115 - returned open, caller closes
    try:
        size = 0
        buf = bytearray()
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise payload_too_large(limit, "upload")
            buf += chunk
            if len(buf) >= _FLUSH:
                await anyio.to_thread.run_sync(fh.write, bytes(buf))
                buf.clear()
        if buf:
            await anyio.to_thread.run_sync(fh.write, bytes(buf))
        fh.seek(0)
        return fh
    except BaseException:
        fh.close()
        raise


def require_json_object(data: bytes) -> dict:
    """Parse a JSON object body or raise 422 ``validation_error``."""
    try:
        obj = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "validation_error", "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    return obj
