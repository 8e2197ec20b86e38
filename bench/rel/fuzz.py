"""Property-based fuzzing of the image and archive decoders (Hypothesis): only the documented errors.

The properties live with the decoders' own tests and run in CI there (``tests/ingest/test_images.py``:
random bytes and mutated PNG/JPEG/GIF/BMP/WebP seeds must decode to ``uint8 (H, W, 3)`` or raise
``ImageError`` with a documented code; ``tests/ingest/test_archives.py``: mutated zip/tar/tar.gz seeds must
read or raise ``DatasetError`` with a code). This scenario runs exactly those tests and reports them.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.rel.common import ScenarioResult, Timer
from bench.servers import REPO

FUZZ_TESTS = ("tests/ingest/test_images.py::test_fuzz_random_bytes",
              "tests/ingest/test_images.py::test_fuzz_mutated_images",
              "tests/ingest/test_archives.py::test_fuzz_mutated_archives")
EXAMPLES = {"test_fuzz_random_bytes": 200, "test_fuzz_mutated_images": 200, "test_fuzz_mutated_archives": 100}


def run(work: Path) -> ScenarioResult:
    res = ScenarioResult("Hypothesis fuzzing of the image and archive decoders")
    xml = work / "fuzz.xml"
    with Timer(res):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               *FUZZ_TESTS], cwd=REPO, capture_output=True, text=True, timeout=900)
    cases = []
    if xml.is_file():
        for tc in ET.parse(xml).getroot().iter("testcase"):
            failed = tc.find("failure") is not None or tc.find("error") is not None
            skipped = tc.find("skipped") is not None
            cases.append({"test": tc.get("name"), "outcome": "failed" if failed else "skipped" if skipped else "passed",
                          "examples": EXAMPLES.get(str(tc.get("name"))), "seconds": float(tc.get("time", 0))})
    res.figures.update({"tests": cases, "pytest_exit": proc.returncode})
    res.check("pytest ran the three fuzz properties", len(cases) == len(FUZZ_TESTS), proc.stdout[-300:])
    res.check("every property held", proc.returncode == 0 and all(c["outcome"] == "passed" for c in cases),
              proc.stdout[-500:])
    return res
