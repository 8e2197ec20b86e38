"""The page and the vendored Swagger UI ship in the wheel (pyproject's package-data), so an installed service
serves /ui and /docs without the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("service/api/ui/index.html", "service/api/static/ui/ui.js", "service/api/static/ui/charts.js",
          "service/api/static/ui/ui.css",
          "service/api/static/swagger-ui/swagger-ui-bundle.js", "service/api/static/swagger-ui/swagger-ui.css",
          "service/api/static/swagger-ui/favicon-32x32.png", "service/api/static/swagger-ui/LICENSE",
          "service/api/static/swagger-ui/NOTICE")


def test_wheel_ships_the_page_and_the_docs_assets(tmp_path: Path):
    pytest.importorskip("setuptools", reason="building a wheel needs setuptools in this environment")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", str(src), "-w", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in NEEDED if n not in names]
    assert not missing, missing
