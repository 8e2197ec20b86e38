"""A real ``classmeans serve`` (uvicorn on 127.0.0.1, a free port, one worker) over a private copy of the tiny
store, shared by the conformance tests of one module; started and stopped as in tests/api/test_e2e.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.test_e2e import Server, start, stop


@pytest.fixture(scope="module")
def live_server(tiny_store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("oip")
    store = work / "store"
    shutil.copytree(tiny_store_root, store)
    srv = start(store, work / "serve.log")
    try:
        yield srv
    finally:
        stop(srv)
