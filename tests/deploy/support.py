"""Helpers of the deployment tests: the repo's deployment files, external tools, processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOCKER_DIR = REPO / "docker"
INSTALL_SH = DOCKER_DIR / "install.sh"
ENTRYPOINT_SH = DOCKER_DIR / "entrypoint.sh"
HEALTHCHECK_PY = DOCKER_DIR / "healthcheck.py"
PROMETHEUS_YML = DOCKER_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = DOCKER_DIR / "grafana"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "classmeans.json"
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------------- tools

def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in this interpreter's venv (where .ci/system-deps.sh puts hadolint)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = VENV_BIN / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def require_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"`{name}` not installed (provided by {package}; .ci/system-deps.sh installs it)")
    return path


def serve_command_available() -> bool:
    """Whether ``classmeans serve`` exists in this checkout (service/cli/serve_cmd.py)."""
    return (REPO / "service" / "cli" / "serve_cmd.py").is_file()


def require_serve_command() -> None:
    if not serve_command_available():
        pytest.skip("`classmeans serve` is not in this checkout yet (service/cli/serve_cmd.py)")


# --------------------------------------------------------------------------------------------- YAML

def load_yaml(path_or_text: Path | str) -> object:
    """Parse YAML with PyYAML: in process when importable, else with the interpreter that runs docker-compose
    (Debian's docker-compose depends on python3-yaml). Skips when neither has it."""
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    compose = find_tool("docker-compose")
    interpreter = None
    if compose is not None:
        first = Path(compose).read_bytes()[:200].split(b"\n", 1)[0]
        if first.startswith(b"#!"):
            interpreter = shlex.split(first[2:].decode())[0]
    if interpreter is None:
        pytest.skip("no YAML parser: PyYAML is not installed here and docker-compose (python3-yaml) is absent")
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin.read()), sys.stdout)"
    out = subprocess.run([interpreter, "-c", code], input=text, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ValueError(f"YAML parse failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------------------------- Dockerfile

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str     # the rest of the logical line, continuations joined
    line: int     # 1-based line of the instruction's start


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        logical = " ".join(part for part in buf if part)
        keyword, _, args = logical.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = []
    if buf:
        raise ValueError("Dockerfile ends inside a continued line")
    return out


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
    args = args.strip()
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return None


def parse_duration_s(text: str) -> float:
    """Docker/Compose durations: ``45s``, ``1m30s``, ``1h``, ``500ms``; a bare number means seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    total, num = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else "us" if text.startswith("us", i) else ch
        if unit not in units or not num:
            raise ValueError(f"bad duration {text!r}")
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num:
        raise ValueError(f"bad duration {text!r}")
    return total


# --------------------------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.25,
               what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


@dataclass
class Proc:
    """A child process in its own session (so teardown can end it and its children), logging to a file."""

    name: str
    popen: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def terminate(self, grace_s: float = 10.0, group: bool = True) -> int | None:
        """SIGTERM (the process group, or with ``group=False`` only the main process, as ``docker stop``
        does), wait up to ``grace_s``, then SIGKILL the whole process group; returns the exit code."""
        if self.popen.poll() is None:
            try:
                if group:
                    os.killpg(self.popen.pid, signal.SIGTERM)
                else:
                    os.kill(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        return self.popen.returncode


@contextmanager
def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None, grace_s: float = 10.0) -> Iterator[Proc]:
    fh = log.open("wb")
    try:
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd, start_new_session=True)
    finally:
        fh.close()
    proc = Proc(name, popen, log)
    try:
        yield proc
    finally:
        proc.terminate(grace_s)


def service_env(store: Path, port: int, seed: Path | None, token: str, model: str = "tiny") -> dict[str, str]:
    """Environment of a `classmeans serve` child: loopback only, one torch thread, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CLASSMEANS_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({
        "CLASSMEANS_STORE": str(store),
        "CLASSMEANS_MODEL": model,
        "CLASSMEANS_HOST": "127.0.0.1",
        "CLASSMEANS_PORT": str(port),
        "CLASSMEANS_ADMIN_TOKEN": token,
        "CLASSMEANS_TORCH_THREADS": "1",
        "CLASSMEANS_WORKERS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
    })
    if seed is not None:
        env["EMBEDDED_MODEL_STORE"] = str(seed)
    else:
        env.pop("EMBEDDED_MODEL_STORE", None)
    return env


def healthcheck(port: int, path: str = "/v2/health/ready", python: str = sys.executable) -> int:
    """Run the image's healthcheck probe (docker/healthcheck.py) against 127.0.0.1:``port``."""
    env = dict(os.environ, CLASSMEANS_PORT=str(port))
    return subprocess.run([python, str(HEALTHCHECK_PY), path], env=env, capture_output=True,
                          timeout=15).returncode
