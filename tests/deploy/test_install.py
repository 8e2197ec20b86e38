"""The image's install and start steps, run here without a Docker engine.

docker/install.sh is the only place with pip commands; the Dockerfile runs it for the image, and these tests
run it in CI mode. To avoid a second multi-GB virtualenv, CI installs into a throwaway venv layered over the
CI venv (a ``.pth`` file puts the CI venv's site-packages on its path): torch and every other dependency are
then "already satisfied", and only the project itself is built and installed, from a copy of exactly the
files the Dockerfile copies into /app. The start step is docker/entrypoint.sh with the image's command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy.conftest import start_service
from tests.deploy.support import (
    DOCKERFILE,
    ENTRYPOINT_SH,
    INSTALL_SH,
    REPO,
    free_port,
    healthcheck,
    parse_dockerfile,
    require_serve_command,
)

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What CI passes instead of the Dockerfile's arguments: its own venv, and pip's own configuration for torch.
CI_ARGS = ["--no-torch-index"]


def dockerfile_install_runs() -> list[list[str]]:
    """argv of each `RUN sh docker/install.sh ...`, with the build ARG defaults substituted."""
    ins = parse_dockerfile(DOCKERFILE.read_text())
    args = {}
    for i in ins:
        if i.keyword == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            args[k] = v
    out = []
    for i in ins:
        if i.keyword == "RUN" and "docker/install.sh" in i.args:
            text = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), i.args)
            out.append(shlex.split(text))
    return out


def image_argv(run: list[str]) -> list[str]:
    """The script's own arguments in a Dockerfile RUN (after `sh docker/install.sh`)."""
    return run[run.index("docker/install.sh") + 1:]


def dry_run(args: list[str], script: Path = INSTALL_SH) -> list[str]:
    out = subprocess.run(["sh", str(script), *args, "--dry-run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(ln.startswith("+ ") for ln in lines), out.stdout
    return [ln[2:] for ln in lines]


def normalise(cmds: list[str], venv: str, project: str) -> list[str]:
    return [c.replace(project, "<project>").replace(venv, "<venv>") for c in cmds]


def test_install_script_refuses_ambiguous_calls():
    for args in ([], ["--venv", "/x"], ["--venv", "/x", "--no-torch-index", "--step", "nope"], ["--bogus"]):
        out = subprocess.run(["sh", str(INSTALL_SH), *args, "--dry-run"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 2, (args, out.stdout)


def test_dockerfile_and_ci_run_the_same_pip_commands(tmp_path):
    """Single source of truth: the image's commands, minus PyTorch's CPU index, are exactly CI's commands."""
    runs = dockerfile_install_runs()
    image_cmds: list[str] = []
    for run in runs:
        argv = image_argv(run)
        venv = argv[argv.index("--venv") + 1]
        # the image's venv does not exist here, so the dry run also shows the venv creation; drop it
        image_cmds += [c for c in dry_run(argv) if " -m venv " not in c]
    image_cmds = normalise(image_cmds, venv, str(REPO))
    torch_cmds = [c for c in image_cmds if "torch==" in c]
    assert len(torch_cmds) == 1 and f"--index-url {CPU_INDEX} " in torch_cmds[0], image_cmds
    assert "torchvision==" in torch_cmds[0]

    ci_venv = tmp_path / "venv"
    (ci_venv / "bin").mkdir(parents=True)
    (ci_venv / "bin" / "python").symlink_to(sys.executable)
    ci_cmds = normalise(dry_run(["--venv", str(ci_venv), *CI_ARGS]), str(ci_venv), str(REPO))
    assert ci_cmds == [c.replace(f"--index-url {CPU_INDEX} ", "") for c in image_cmds]
    assert ci_cmds == [
        f"<venv>/bin/python -m pip install --no-cache-dir torch=={pins()[0]} torchvision=={pins()[1]}",
        "<venv>/bin/python -m pip install --no-cache-dir <project>",
        "<venv>/bin/python -m pip check",
    ]


def pins() -> tuple[str, str]:
    text = INSTALL_SH.read_text()
    torch = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([^}]+)\}"', text)
    vision = re.search(r'TORCHVISION_VERSION="\$\{TORCHVISION_VERSION:-([^}]+)\}"', text)
    assert torch and vision
    return torch.group(1), vision.group(1)


def test_torch_pins_fit_pyproject_and_match_ci():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = {(r := Requirement(d)).name: r.specifier for d in deps}  # names, versions and markers parsed as pip does
    torch_pin, vision_pin = pins()
    assert Version(torch_pin) in spec["torch"], (torch_pin, spec["torch"])
    assert Version(vision_pin) in spec["torchvision"], (vision_pin, spec["torchvision"])
    import torch
    import torchvision
    # CI tests the same torch release the image ships (CI's wheel may be another build, e.g. +cu or +cpu)
    assert Version(torch.__version__).base_version == torch_pin
    assert Version(torchvision.__version__).base_version == vision_pin


def test_entrypoint_seeds_the_store_once(tmp_path):
    seed = tmp_path / "seed"
    (seed / "m1" / "bundles").mkdir(parents=True)
    (seed / "m1" / "model.json").write_text('{"v": 1}')
    (seed / ".admin_token").write_text("not a model")
    store = tmp_path / "store"
    store.mkdir()
    (store / ".seed-m1.host.12").mkdir()  # the leftover of a crashed copy, two hours old
    os.utime(store / ".seed-m1.host.12", (time.time() - 7200, time.time() - 7200))
    env = {"PATH": os.environ["PATH"], "CLASSMEANS_STORE": str(store), "EMBEDDED_MODEL_STORE": str(seed)}

    def start() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(ENTRYPOINT_SH), "sh", "-c", "echo started $0", "ok"], env=env,
                              capture_output=True, text=True, timeout=30)

    out = start()
    assert out.returncode == 0 and out.stdout.strip() == "started ok", out
    assert (store / "m1" / "model.json").read_text() == '{"v": 1}'
    assert sorted(p.name for p in store.iterdir()) == ["m1"], "no leftovers, no dotfiles from the seed"
    (store / "m1" / "model.json").write_text('{"v": "uploaded"}')
    assert start().returncode == 0
    assert (store / "m1" / "model.json").read_text() == '{"v": "uploaded"}', "an existing model is kept"


def test_entrypoint_seeds_once_when_replicas_start_together(tmp_path):
    """`docker compose up --scale`: replicas seeding one shared volume at once end with one whole model and no
    leftovers, and every one of them starts."""
    seed = tmp_path / "seed"
    (seed / "m1" / "bundles").mkdir(parents=True)
    for i in range(200):
        (seed / "m1" / "bundles" / f"f{i}").write_text("x" * 1000)
    (seed / "m1" / "model.json").write_text('{"v": 1}')
    store = tmp_path / "store"
    store.mkdir()
    env = {"PATH": os.environ["PATH"], "CLASSMEANS_STORE": str(store), "EMBEDDED_MODEL_STORE": str(seed)}
    procs = [subprocess.Popen(["sh", str(ENTRYPOINT_SH), "true"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(4)]
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0, 0, 0, 0]
    assert sorted(p.name for p in store.iterdir()) == ["m1"]
    assert sorted(p.name for p in (store / "m1").iterdir()) == ["bundles", "model.json"], "no copy nested inside"
    assert len(list((store / "m1" / "bundles").iterdir())) == 200


def test_healthcheck_fails_when_nothing_listens():
    assert healthcheck(free_port()) == 1


def dockerfile_app_sources() -> list[str]:
    """What the Dockerfile copies into /app before the project install (the build context of the wheel)."""
    srcs = []
    for ins in parse_dockerfile(DOCKERFILE.read_text()):
        if ins.keyword == "COPY":
            *sources, dest = ins.args.split()
            if not dest.startswith("/") or dest.startswith("/app"):
                srcs += sources
    return srcs


def overlay_venv(path: Path) -> Path:
    """A fresh venv that also sees the CI venv's packages (read-only, via a .pth), so nothing big is copied."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", str(path)], check=True, timeout=300, capture_output=True)
    purelib = subprocess.run([str(path / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    ci_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "_ci_venv_overlay.pth").write_text("".join(f"{p}\n" for p in ci_paths))
    return path


@pytest.mark.slow
def test_install_and_start_the_way_the_image_does(tmp_path, tiny_store_root):
    """docker/install.sh for real (CI mode) into an overlay venv, from a copy of what the image copies to
    /app; then docker/entrypoint.sh starts the installed `classmeans serve` (seeding an empty store), the
    image's healthcheck passes, and SIGTERM drains and exits cleanly within the stop grace period."""
    require_serve_command()
    app = tmp_path / "app"
    for src in dockerfile_app_sources():
        s = REPO / src.rstrip("/")
        assert s.exists(), f"the Dockerfile copies {src}, which this checkout lacks (docker build would fail)"
        d = app / src.rstrip("/")
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, d)
    venv = overlay_venv(tmp_path / "venv")
    started = time.monotonic()
    out = subprocess.run(["sh", str(app / "docker" / "install.sh"), "--venv", str(venv), *CI_ARGS],
                         capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Successfully installed classmeans-serve" in out.stdout, out.stdout[-2000:]
    assert time.monotonic() - started < 540

    # the server runs from the installed copy, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import service; print(service.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where

    store = tmp_path / "store"  # empty, like a fresh volume: the entrypoint seeds it
    with start_service(venv / "bin", tiny_store_root, store, tmp_path / "serve.log") as svc:
        assert (store / "tiny" / "model.json").is_file()
        with httpx.Client(base_url=svc.url, timeout=30, trust_env=False) as c:
            assert c.get("/v2/health/live").status_code == 200
            assert c.get("/readyz").status_code == 200
        assert svc.proc.popen.args[:2] == ["sh", str(ENTRYPOINT_SH)]
        t0 = time.monotonic()
        code = svc.proc.terminate(grace_s=35.0, group=False)  # like docker stop
        elapsed = time.monotonic() - t0
    # uvicorn re-raises the signal after a graceful shutdown, so the status may be "killed by SIGTERM" (143 in
    # docker ps); what matters is that the drain ran to completion, in time, and not via SIGKILL.
    log = svc.proc.log_tail(20000)
    assert code in (0, -signal.SIGTERM), f"exit code {code} after SIGTERM:\n{log}"
    assert "Application shutdown complete" in log, log
    assert elapsed < 35.0
