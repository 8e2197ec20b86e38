"""A real ``classmeans serve`` (uvicorn on 127.0.0.1, a free port, one worker) over a private copy of the tiny
store, shared by the conformance tests of one module; started and stopped as in tests/api/test_e2e.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.api.conftest import png_bytes, sample_images
from tests.api.test_e2e import Server, serve_copy
from tests.oip.helpers import N_IMAGES


@pytest.fixture(scope="module")
def live_server(tiny_store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_copy(tiny_store_root, tmp_path_factory, "oip")


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, list[bytes]]:
    """``N_IMAGES`` test images: their pixels and their PNG encodings."""
    pixels, _ = sample_images(N_IMAGES)
    return pixels, [png_bytes(p) for p in pixels]


@pytest.fixture(scope="module")
def reference(live_server: Server, images) -> list[dict[str, Any]]:
    """What ``/classify`` says about each image (the answer every client's inference is checked against)."""
    with live_server.client() as c:
        out = []
        for png in images[1]:
            r = c.post("/classify", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            out.append(r.json()["predictions"][0])
    return out
