"""docker-compose.yml through a real Compose parser (docker-compose config), and its consistency with the
Dockerfile, the Prometheus config and the Grafana provisioning."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import (
    COMPOSE,
    DOCKER_DIR,
    DOCKERFILE,
    GRAFANA_DIR,
    PROMETHEUS_YML,
    exec_form,
    load_yaml,
    parse_dockerfile,
    parse_duration_s,
    require_tool,
)

SERVICE = "classmeans"
ENV_FILE = "docker/.env"


def compose_tree(tmp_path: Path, with_env: bool = True) -> Path:
    """A copy of the compose project (compose file, Dockerfile, docker/) as a clean clone has it, plus
    docker/.env made from docker/.env.example (the real one is git-ignored)."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(COMPOSE, root / COMPOSE.name)
    shutil.copy2(DOCKERFILE, root / DOCKERFILE.name)
    shutil.copytree(DOCKER_DIR, root / "docker", ignore=shutil.ignore_patterns(".env", "__pycache__"))
    if with_env:
        shutil.copy2(DOCKER_DIR / ".env.example", root / ENV_FILE)
    return root


def compose(root: Path, *args: str) -> subprocess.CompletedProcess:
    exe = require_tool("docker-compose", "Debian package docker-compose")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root)}  # no CLASSMEANS_* or COMPOSE_* from the caller
    return subprocess.run([exe, "--project-directory", str(root), "-f", str(root / COMPOSE.name), *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=root)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> tuple[Path, dict]:
    root = compose_tree(tmp_path_factory.mktemp("compose"))
    out = compose(root, "config")
    assert out.returncode == 0, out.stderr
    return root, load_yaml(out.stdout)


def test_compose_config_is_valid(tmp_path):
    out = compose(compose_tree(tmp_path), "config", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_compose_requires_the_env_file(tmp_path):
    out = compose(compose_tree(tmp_path, with_env=False), "config", "-q")
    assert out.returncode != 0
    assert ".env" in out.stderr


def test_admin_token_comes_from_the_env_file(resolved):
    _, cfg = resolved
    svc = cfg["services"][SERVICE]
    assert "CLASSMEANS_ADMIN_TOKEN" in svc["environment"], "docker-compose config inlines env_file values"
    raw = load_yaml(COMPOSE)
    assert raw["services"][SERVICE]["env_file"] == [ENV_FILE]
    assert "CLASSMEANS_ADMIN_TOKEN" not in str(raw["services"][SERVICE].get("environment", {}))
    example = (DOCKER_DIR / ".env.example").read_text()
    assert "CLASSMEANS_ADMIN_TOKEN=" in example
    assert ENV_FILE in (COMPOSE.parent / ".gitignore").read_text().splitlines()


def test_ports_are_published_on_loopback_by_default(resolved):
    _, cfg = resolved
    published = {name: svc.get("ports", []) for name, svc in cfg["services"].items()}
    assert any(str(p).endswith(":8000:8000/tcp") or str(p).endswith(":8000:8000") for p in published[SERVICE])
    for name, ports in published.items():
        for p in ports:
            host = str(p).split(":")[0]
            assert host == "127.0.0.1", f"{name} publishes {p} beyond loopback"
    assert {"classmeans", "prometheus", "grafana"} <= set(cfg["services"])


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in parse_dockerfile(DOCKERFILE.read_text()):
        if ins.keyword == "ENV":
            for item in ins.args.split():
                if "=" in item:
                    k, _, v = item.partition("=")
                    env[k] = v
    return env


def graceful_timeout_s() -> float:
    """The server's graceful-shutdown time: its settings' default when importable, else the 30 s of the
    design notes (uvicorn timeout_graceful_shutdown)."""
    try:
        from service.api.settings import Settings
    except ImportError:
        return 30.0
    field = Settings.model_fields.get("graceful_timeout_s")
    return float(field.default) if field is not None else 30.0


def test_stop_grace_period_outlasts_the_graceful_shutdown(resolved):
    _, cfg = resolved
    svc = cfg["services"][SERVICE]
    grace = parse_duration_s(svc["stop_grace_period"])
    assert grace >= graceful_timeout_s() + 5, (grace, graceful_timeout_s())
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    stop = [i.args for i in parse_dockerfile(DOCKERFILE.read_text()) if i.keyword == "STOPSIGNAL"]
    assert stop == ["SIGTERM"]


def test_service_volume_is_the_image_store(resolved):
    _, cfg = resolved
    env = dockerfile_env()
    (volume,) = [i for i in parse_dockerfile(DOCKERFILE.read_text()) if i.keyword == "VOLUME"]
    targets = [str(v).split(":")[1] for v in cfg["services"][SERVICE]["volumes"]]
    assert exec_form(volume.args) == [env["CLASSMEANS_STORE"]] == [t for t in targets if "model_store" in t]


def test_bind_mounts_exist(resolved):
    root, cfg = resolved
    for name, svc in cfg["services"].items():
        for v in svc.get("volumes", []):
            src = str(v).split(":")[0]
            if src.startswith("/"):
                assert Path(src).exists(), f"{name} mounts missing {src}"
                assert Path(src).resolve().is_relative_to(root.resolve()), f"{name} mounts {src} outside"


def container_path(cfg: dict, service: str, host_rel: str) -> str:
    """Where ``host_rel`` (relative to the project) is mounted in ``service``."""
    for v in cfg["services"][service]["volumes"]:
        src, dst = str(v).split(":")[:2]
        if src.endswith("/" + host_rel.rstrip("/")):
            return dst
    raise AssertionError(f"{host_rel} not mounted in {service}")


def test_prometheus_scrapes_the_service(resolved):
    _, cfg = resolved
    prom = load_yaml(PROMETHEUS_YML)
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    job = jobs["classmeans"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{SERVICE}:8000"]
    mounted = container_path(cfg, "prometheus", "docker/prometheus/prometheus.yml")
    assert f"--config.file={mounted}" in cfg["services"]["prometheus"]["command"]


def test_promtool_accepts_the_prometheus_config():
    promtool = require_tool("promtool", "Debian package prometheus")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_matches_the_mounts(resolved):
    _, cfg = resolved
    prov_dst = container_path(cfg, "grafana", "docker/grafana/provisioning")
    dash_dst = container_path(cfg, "grafana", "docker/grafana/dashboards")
    assert prov_dst == "/etc/grafana/provisioning"
    ds = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (prom,) = ds["datasources"]
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in cfg["services"]
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "classmeans.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [dash_dst]
    home = cfg["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dst}/classmeans.json"
    assert (GRAFANA_DIR / "dashboards" / "classmeans.json").is_file()
