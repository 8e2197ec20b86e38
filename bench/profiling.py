"""py-spy sampling of a running server, summarised: where the server's threads spend their time.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``). The summary gives the
share of samples per leaf function ("self" time) and per chosen hot-path region ("inclusive": decode,
exit runner, class-means heads, batching, HTTP/JSON), over the samples of every thread that was not idle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Hot-path regions: a sample counts for a region when any frame of its stack contains the marker.
REGIONS: dict[str, tuple[str, ...]] = {
    "image decode (Pillow)": ("decode_image (service/ingest/images.py",),
    "backbone stages (torch conv/bn)": ("forward (torch/nn/modules/conv.py", "forward (torch/nn/modules/batchnorm.py",
                                        "_conv_forward"),
    "class-means heads (distances, probabilities)": ("probabilities (service/earlyexit/exit_head.py",),
    "exit runner bookkeeping (compaction, indexing)": ("run (service/runtime/runner.py",),
    "engine (grouping, answers, metrics)": ("_run_group (service/runtime/engine.py",
                                            "observe_samples (service/runtime/metrics.py"),
    "HTTP + JSON (uvicorn, starlette, pydantic)": ("uvicorn/", "starlette/", "pydantic", "fastapi/", "json/"),
}
IDLE_MARKERS = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
                "run_forever", "_run_once", "poll (", "epoll")


def py_spy() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe if Path(exe).is_file() else None


def start(pid: int, out: Path, duration_s: int, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` on ``pid`` (with its threads, idle frames dropped); None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", str(rate),
            "--format", "raw", "--output", str(out), "--nonblocking", "--subprocesses"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self-time shares of leaf frames and inclusive shares of :data:`REGIONS` from a raw py-spy file."""
    leaves: Counter[str] = Counter()
    regions: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(m in frames[-1] for m in IDLE_MARKERS):
            continue
        n = int(count)
        total += n
        leaves[frames[-1]] += n
        for region, markers in REGIONS.items():
            if any(m in f for f in frames for m in markers):
                regions[region] += n
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "regions": {k: regions[k] / total for k in REGIONS},
            "top_self": [{"frame": f, "share": n / total} for f, n in leaves.most_common(top)]}
