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

# Hot-path regions: (markers, leaf_only). A sample counts for a region when a frame of its stack (or only
# its innermost frame, for "self" regions) contains one of the markers. py-spy names frames
# ``function (file:line)``, with the file relative to the import root or shortened to its name.
REGIONS: dict[str, tuple[tuple[str, ...], bool]] = {
    "image decode (Pillow)": (("decode_image (",), False),
    "backbone stages (torch conv/bn/relu)": (("Conv2d._conv_forward", "batch_norm (", "relu (", "BasicBlock.forward",
                                              "Sequential.forward"), False),
    "class-means heads (distances, probabilities)": (("ExitHead.probabilities",), False),
    "exit runner bookkeeping (self time: thresholds, compaction)": (("CascadeRunner.", "_Outputs.", "_decide ("),
                                                                    True),
    "engine + metrics (self time: grouping, answers, Prometheus)": (("Engine.", "Metrics.", "prometheus_client/"),
                                                                    True),
    "HTTP + JSON (uvicorn protocol, starlette, fastapi, pydantic)": (("uvicorn/protocols", "starlette/", "fastapi/",
                                                                     "pydantic", "json/"), False),
}
IDLE_MARKERS = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
                "run_forever", "_run_once", "poll (", "epoll")
# uvloop runs the event loop in C: a sample whose innermost Python frame is the asyncio runner is the loop
# waiting for I/O or parsing in native code (not separable without --native); counted apart.
NATIVE_LOOP = "Runner.run (asyncio/runners.py"


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
    total = native = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(m in frames[-1] for m in IDLE_MARKERS):
            continue
        n = int(count)
        if NATIVE_LOOP in frames[-1]:
            native += n
            continue
        total += n
        leaves[frames[-1]] += n
        for region, (markers, leaf_only) in REGIONS.items():
            if any(m in f for f in (frames[-1:] if leaf_only else frames) for m in markers):
                regions[region] += n
    if not total:
        return {"samples": 0}
    return {"samples": total, "event_loop_native_samples": native,
            "regions": {k: regions[k] / total for k in REGIONS},
            "top_self": [{"frame": f, "share": n / total} for f, n in leaves.most_common(top)]}
