"""Fixtures of the deployment tests: a `classmeans serve` started the way the image starts it."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.metrics_contract import DOCUMENTED, Family, exported_from_text
from tests.deploy.support import (
    ENTRYPOINT_SH,
    Proc,
    free_port,
    healthcheck,
    require_serve_command,
    serve_command_available,
    service_env,
    spawn,
    wait_until,
)

STARTUP_TIMEOUT_S = 180.0  # model load + warm-up of the tiny model on a busy 2-core machine


@dataclass
class LiveService:
    proc: Proc
    port: int
    token: str
    store: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def metrics_text(self) -> str:
        with self.client() as c:
            r = c.get("/metrics")
        r.raise_for_status()
        return r.text


def start_service(python_bin: Path, seed: Path, store: Path, log: Path, model: str = "tiny"):
    """Context manager: `docker/entrypoint.sh <bin>/classmeans serve` (the image's start step: seed the
    writable store from ``seed``, then exec the server) on 127.0.0.1; waits until the image's healthcheck
    passes."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = service_env(store, port, seed, token, model=model)
    argv = ["sh", str(ENTRYPOINT_SH), str(python_bin / "classmeans"), "serve"]
    cm = spawn("classmeans serve", argv, log, env=env, cwd=log.parent, grace_s=45.0)

    class _Ctx:
        def __enter__(self) -> LiveService:
            proc = cm.__enter__()
            svc = LiveService(proc, port, token, store, model)
            try:
                def ready() -> bool:
                    proc.check_alive()
                    return healthcheck(port) == 0
                wait_until(ready, STARTUP_TIMEOUT_S, interval_s=0.5, what="/v2/health/ready")
            except BaseException:
                tail = proc.log_tail()
                cm.__exit__(None, None, None)
                raise AssertionError(f"service did not become ready; log tail:\n{tail}") from None
            return svc

        def __exit__(self, *exc: object) -> None:
            cm.__exit__(*exc)

    return _Ctx()


@pytest.fixture(scope="session")
def live_service(tiny_store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """One `classmeans serve` (the CI venv's, started through docker/entrypoint.sh) serving the tiny model from
    a store seeded the way the image seeds its volume. Shared by the Prometheus and dashboard tests."""
    require_serve_command()
    work = tmp_path_factory.mktemp("live")
    with start_service(Path(sys.executable).parent, tiny_store_root, work / "store", work / "serve.log") as svc:
        yield svc


@pytest.fixture(scope="session")
def exported_families(request: pytest.FixtureRequest) -> tuple[str, dict[str, Family]]:
    """(source, families) the service exports: the live /metrics of a running `classmeans serve` when this
    checkout has it, else the service's metrics registry rendered in process, else the documented list."""
    if serve_command_available():
        svc: LiveService = request.getfixturevalue("live_service")
        return "live /metrics", exported_from_text(svc.metrics_text())
    try:
        from service.serving.metrics import Metrics
    except ImportError:
        return "documented list", dict(DOCUMENTED)
    m = Metrics("tiny")
    m.configure_exits(3)
    return "service.serving.metrics", exported_from_text(m.render().decode())
