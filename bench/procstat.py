"""Resource figures of a server process tree from ``/proc`` (Linux): RSS, peak RSS, CPU seconds.

A server may be several processes (LitServe runs its model in a worker process), so every figure is the
sum over the process and its descendants. Where ``/proc`` is missing the figures are ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = PROC / str(pid) / "task"
    try:
        tids = [t.name for t in task_dir.iterdir()]
    except OSError:
        return out
    for tid in tids:
        try:
            text = (task_dir / tid / "children").read_text()
        except OSError:
            continue
        out.extend(int(c) for c in text.split())
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant that is still alive."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen or not (PROC / str(p)).is_dir():
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # fields[11], fields[12] = utime, stime (fields 14 and 15 of stat(5), counted after the comm field)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class TreeSample:
    """One reading of a process tree: resident and peak resident memory (MiB), CPU seconds used."""

    processes: int
    rss_mib: float
    peak_rss_mib: float
    cpu_seconds: float


def sample(pid: int | None) -> TreeSample | None:
    """Read the tree rooted at ``pid`` now; ``None`` without ``/proc`` or a pid."""
    if pid is None or not PROC.is_dir():
        return None
    pids = process_tree(pid)
    if not pids:
        return None
    return TreeSample(len(pids), sum(_status_kib(p, "VmRSS") for p in pids) / 1024,
                      sum(_status_kib(p, "VmHWM") for p in pids) / 1024, sum(_cpu_seconds(p) for p in pids))


def per_process(pid: int | None) -> list[dict[str, object]]:
    """RSS (MiB) and command line of ``pid`` and each live descendant (a server's supervisor, its workers,
    LitServe's inference processes); empty without ``/proc`` or a pid."""
    if pid is None or not PROC.is_dir():
        return []
    out: list[dict[str, object]] = []
    for p in process_tree(pid):
        try:
            cmd = (PROC / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        out.append({"pid": p, "rss_mib": _status_kib(p, "VmRSS") / 1024, "cmd": cmd[:160]})
    return out


def cpu_flags(*wanted: str) -> dict[str, bool]:
    """Whether the CPU advertises each flag in ``wanted`` (``/proc/cpuinfo``; all False without it)."""
    flags: set[str] = set()
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in wanted}


def cpu_model() -> str:
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def mem_total_gib() -> float | None:
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None
