"""Checks shared by the Open Inference Protocol tests."""

from __future__ import annotations

from typing import Any

import httpx

N_IMAGES = 4  # images per conformance module (conftest's `images` fixture)


def assert_oip_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The protocol's error body (``{"error": "<message>"}``) with our stable code beside it and in a header."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body.get("code") == code, body
    assert r.headers.get("x-classmeans-error-code") == code
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body
