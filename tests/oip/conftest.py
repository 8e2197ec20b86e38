"""A real ``classmeans serve`` (uvicorn on 127.0.0.1, a free port) over a private copy of the tiny store, shared
by the conformance tests of one module. It runs ``python -m service.cli.main`` from this checkout's root, so the
server is this tree's code even where the venv's ``classmeans`` script points at another checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import MODEL, TOKEN
from tests.api.test_e2e import START_TIMEOUT_S, Server, free_port, stop
from tests.factories import REPO


def start_server(store: Path, log: Path, **extra_env: str) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMEANS_")}
    env.update({"CLASSMEANS_ADMIN_TOKEN": TOKEN, "CLASSMEANS_TORCH_THREADS": "1", "PYTHONPATH": str(REPO),
                "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **extra_env})
    argv = [sys.executable, "-m", "service.cli.main", "serve", "--store", str(store), "--model", MODEL,
            "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(proc, f"http://127.0.0.1:{port}", log, store)
    deadline = time.monotonic() + START_TIMEOUT_S
    with server.client() as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{server.log_text()[-3000:]}")
            try:
                if c.get("/readyz").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    stop(server)
    raise AssertionError(f"server not ready in {START_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def live_server(tiny_store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("oip")
    store = work / "store"
    shutil.copytree(tiny_store_root, store)
    srv = start_server(store, work / "serve.log")
    try:
        yield srv
    finally:
        stop(srv)
