"""Start and stop the servers under test as child processes on 127.0.0.1, each on a free port.

Every child runs in its own session (process group), logs to a file, and is ended by :meth:`Server.stop`:
SIGTERM to the group, a bounded wait, then SIGKILL to the group. Nothing listens beyond loopback.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running child process serving HTTP on ``127.0.0.1:port``."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def client(self, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False, headers=headers)

    def wait_ready(self, path: str, timeout_s: float = 240.0) -> None:
        """Poll ``path`` until it answers 200; raises with the log tail if the child dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as c:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
                with suppress(httpx.HTTPError):
                    if c.get(path).status_code == 200:
                        return
                time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only (as ``docker stop`` does)."""
        with suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash)."""
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the group, wait up to ``grace_s``, then SIGKILL it; returns the exit status."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        # LitServe leaves worker processes in the group: make sure none survives.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without proxies or ``CLASSMEANS_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CLASSMEANS_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str], port: int, token: str = "") -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=REPO, start_new_session=True)
    return Server(name, popen, port, log, token)


def classmeans_env(store: Path, model: str, port: int, token: str, **settings: object) -> dict[str, str]:
    env = {"CLASSMEANS_STORE": str(store), "CLASSMEANS_MODEL": model, "CLASSMEANS_HOST": "127.0.0.1",
           "CLASSMEANS_PORT": str(port), "CLASSMEANS_ADMIN_TOKEN": token, "CLASSMEANS_LOG_LEVEL": "warning",
           "CLASSMEANS_WORKERS": "1"}
    env.update({f"CLASSMEANS_{k.upper()}": str(v) for k, v in settings.items()})
    return child_env(env)


@contextmanager
def classmeans_server(store: Path, model: str, log: Path, module: str = "service.cli.main",
                      extra_env: dict[str, str] | None = None, ready_timeout_s: float = 240.0,
                      grace_s: float = 30.0, prefix: list[str] | None = None,
                      **settings: object) -> Iterator[Server]:
    """``classmeans serve`` (or a harness ``module`` that wraps it) on a free port; stopped on exit.
    ``prefix`` goes before the command (e.g. ``["taskset", "-c", "0"]``)."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = classmeans_env(store, model, port, token, **settings)
    env.update(extra_env or {})
    srv = spawn(f"classmeans serve ({model})", [*(prefix or []), PYTHON, "-m", module, "serve"], log, env, port,
                token)
    try:
        srv.wait_ready("/v2/health/ready", ready_timeout_s)
        yield srv
    finally:
        srv.stop(grace_s)


DEFAULT_MODEL_NAME = "cifar10-cascade"  # `classmeans serve`'s default --model


def store_models(model_dir: Path) -> list[str]:
    """The model folders a server of ``model_dir`` needs: itself, and a cascade's members (its ``model.json``)."""
    from service.store.cascade_dir import is_cascade, member_names
    from service.store.model_dir import read_spec

    spec = read_spec(model_dir)
    return [model_dir.name, *(member_names(spec) if is_cascade(spec) else [])]


def copy_model(model_dir: Path, store: Path, ignore: tuple[str, ...] = ("*.tmp",)) -> Path:
    """Copy ``model_dir`` (and a cascade's members, its siblings) into the store ``store``; returns the copy."""
    for name in store_models(model_dir):
        shutil.copytree(model_dir.parent / name, store / name, ignore=shutil.ignore_patterns(*ignore))
    return store / model_dir.name


def oob_argv(store: Path, model: str, port: int) -> list[str]:
    """The README's ``classmeans serve`` with only what running it on a store copy needs: ``--store`` and
    ``--port`` (``--model`` only when the model is not the default one)."""
    argv = [PYTHON, "-m", "service.cli.main", "serve", "--store", str(store), "--port", str(port)]
    if model != DEFAULT_MODEL_NAME:
        argv += ["--model", model]
    return argv


@contextmanager
def classmeans_oob_server(store: Path, model: str, log: Path, prefix: list[str] | None = None,
                          ready_timeout_s: float = 240.0, grace_s: float = 30.0) -> Iterator[Server]:
    """``classmeans serve`` out of the box: no ``CLASSMEANS_*`` environment but the admin token (the README
    exports one), every other setting (workers, threads, batching) its default; stopped on exit."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = child_env({"CLASSMEANS_ADMIN_TOKEN": token})
    srv = spawn(f"classmeans serve out of the box ({model})", [*(prefix or []), *oob_argv(store, model, port)],
                log, env, port, token)
    try:
        srv.wait_ready("/v2/health/ready", ready_timeout_s)
        yield srv
    finally:
        srv.stop(grace_s)


@contextmanager
def litserve_server(model_dir: Path, log: Path, max_batch_size: int, batch_timeout_s: float,
                    torch_threads: int, ready_timeout_s: float = 240.0, workers_per_device: int = 1,
                    onnx: Path | None = None, raw_body: bool = False,
                    prefix: list[str] | None = None) -> Iterator[Server]:
    """``bench/litserve_server.py`` on a free port; stopped on exit. ``onnx``: serve that ONNX file through
    ONNX Runtime (``torch_threads`` then sets ORT's intra-op threads); ``raw_body``: accept a raw
    ``image/*`` body instead of JSON with a base64 PNG."""
    port = free_port()
    argv = [*(prefix or []), PYTHON, "-m", "bench.litserve_server", "--model-dir", str(model_dir),
            "--port", str(port), "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout_s),
            "--torch-threads", str(torch_threads), "--workers-per-device", str(workers_per_device)]
    if onnx is not None:
        argv += ["--onnx", str(onnx)]
    if raw_body:
        argv += ["--raw-body"]
    srv = spawn("litserve", argv, log, child_env(), port)
    try:
        srv.wait_ready("/health", ready_timeout_s)
        yield srv
    finally:
        srv.stop(15.0)
