"""A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator's cheap transport.

Why: on this 2-core machine the client shares the CPU with the server under test. httpx costs about
1 ms of CPU per request (measured: the 32-client httpx load generator used ~90 % of a core), which
would cap every server at the same client-bound rate. This client writes the request bytes itself and
reads a ``Content-Length`` response (both uvicorn servers under test send one), so it costs a few tens
of microseconds per request. Only loopback hosts; no TLS, no redirects, no chunked bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlencode, urlsplit


class RawResponse:
    """The parts of an ``httpx.Response`` the load generator reads."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # lower-case names
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class RawConnectionError(ConnectionError):
    """The connection failed or the server closed it mid-response."""


class RawClient:
    """One keep-alive connection to ``base_url`` (reconnects when the server closes it)."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        u = urlsplit(base_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.host_header = f"{self.host}:{self.port}".encode()
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def request(self, method: str, url: str, params: dict[str, str] | None = None, content: bytes = b"",
                      headers: dict[str, str] | None = None) -> RawResponse:
        """Send one request and read its response (bounded by the timeout)."""
        return await asyncio.wait_for(self._request(method, url, params, content, headers or {}), self.timeout_s)

    async def _request(self, method: str, url: str, params: dict[str, str] | None, content: bytes,
                       headers: dict[str, str]) -> RawResponse:
        if self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise RawConnectionError(f"connect: {exc}") from exc
        assert self._reader is not None and self._writer is not None
        target = url + ("?" + urlencode(params) if params else "")
        head = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + self.host_header,
                f"Content-Length: {len(content)}".encode()]
        head += [f"{k}: {v}".encode() for k, v in headers.items()]
        self._writer.write(b"\r\n".join(head) + b"\r\n\r\n" + content)
        try:
            raw_head = await self._reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            hdrs = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    hdrs[k.strip().lower()] = v.strip()
            if "chunked" in hdrs.get("transfer-encoding", ""):
                raise RawConnectionError("chunked responses are not supported by this client")
            body = await self._reader.readexactly(int(hdrs.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, IndexError) as exc:
            await self.close()
            raise RawConnectionError(f"read: {type(exc).__name__}") from exc
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return RawResponse(status, hdrs, body)
