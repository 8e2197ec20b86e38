"""How many cores this process may use, and how to split them into workers x intra-op threads.

A container or a pod is usually limited in two ways that ``os.cpu_count()`` does not see:

* its **affinity** (a cpuset: ``docker run --cpuset-cpus``, Kubernetes' static CPU manager): the cores it
  may run on, ``len(os.sched_getaffinity(0))``;
* its **CFS quota** (``docker run --cpus``, a Kubernetes CPU limit): ``quota / period`` cores' worth of time
  per period, read from cgroup v2 ``cpu.max`` or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.

The usable core count is ``min(affinity, ceil(quota / period))`` (at least 1). Running more busy threads than
that makes the kernel throttle or time-slice them: every request pays for the others' context switches
(measured on 2 cores, default model: 1-client p50 21-25 ms with one worker per core and torch's default
threads, 9.1-9.6 ms with one thread per worker). So the plan keeps ``workers x threads <= cores``:

* nothing set: one worker per usable core, one intra-op thread each;
* workers set: ``threads = max(1, cores // workers)``;
* threads set: ``workers = max(1, cores // threads)``;
* both set: taken as given, with a warning when they oversubscribe.

Pure functions over what the OS reports; ``read_cpu_budget`` is the only one that reads files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """``cores`` usable by this process, and where each limit came from (for the log)."""

    cores: int
    affinity: int
    quota_cores: float | None  # quota / period, None when unlimited or unknown
    host: int

    def describe(self) -> str:
        quota = "no CPU quota" if self.quota_cores is None else f"CPU quota {self.quota_cores:g} cores"
        return f"{self.cores} usable core(s): affinity {self.affinity} of {self.host} host cores, {quota}"


@dataclass(frozen=True)
class ThreadPlan:
    """Worker processes x intra-op threads per worker, and why."""

    workers: int
    threads: int
    why: str

    @property
    def oversubscribed(self) -> bool:
        return "oversubscribe" in self.why


def parse_cgroup2_cpu_max(text: str) -> float | None:
    """``"max 100000"`` -> None; ``"150000 100000"`` -> 1.5 (cores); malformed -> None."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cgroup1_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1: quota ``-1`` is unlimited; otherwise ``quota / period`` cores."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """This process's cgroup folder(s) from /proc/self/cgroup, then the root (a container sees its own
    cgroup mounted at the root)."""
    dirs: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            rel = line.split(":", 2)[-1].lstrip("/")
            for base in (root, root / "cpu", root / "cpu,cpuacct"):
                d = base / rel
                if d not in dirs:
                    dirs.append(d)
    except OSError:
        pass
    for d in (root, root / "cpu", root / "cpu,cpuacct"):
        if d not in dirs:
            dirs.append(d)
    return dirs


def read_quota_cores(root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CFS quota among this process's cgroup folders, in cores (None: unlimited/unknown)."""
    found: list[float] = []
    for d in _own_cgroup_dirs(root):
        try:
            q = parse_cgroup2_cpu_max((d / "cpu.max").read_text())
        except OSError:
            try:
                q = parse_cgroup1_quota((d / "cpu.cfs_quota_us").read_text(),
                                        (d / "cpu.cfs_period_us").read_text())
            except OSError:
                continue
        if q is not None:
            found.append(q)
    return min(found) if found else None


def affinity_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def budget_from(affinity: int, quota_cores: float | None, host: int) -> CpuBudget:
    """``cores = min(affinity, ceil(quota))``, at least 1."""
    cores = affinity if quota_cores is None else min(affinity, max(1, math.ceil(quota_cores - 1e-9)))
    return CpuBudget(max(1, cores), affinity, quota_cores, host)


def read_cpu_budget(root: Path = CGROUP_ROOT) -> CpuBudget:
    """What this process may use now (affinity and cgroup quota)."""
    return budget_from(affinity_cores(), read_quota_cores(root), os.cpu_count() or 1)


def plan_threads(cores: int, workers: int = 0, threads: int = 0) -> ThreadPlan:
    """Workers x intra-op threads for ``cores`` usable cores; ``0`` means "choose"."""
    cores = max(1, cores)
    if workers and threads:
        why = f"{workers} worker(s) x {threads} thread(s) as configured"
        if workers * threads > cores:
            why += f": oversubscribes the {cores} usable core(s)"
        return ThreadPlan(workers, threads, why)
    if workers:
        t = max(1, cores // workers)
        why = f"{workers} worker(s) as configured, {t} thread(s) each to fit {cores} core(s)"
        if workers > cores:
            why += f" (the workers alone oversubscribe the {cores} usable core(s))"
        return ThreadPlan(workers, t, why)
    if threads:
        w = max(1, cores // threads)
        why = f"{threads} thread(s) per worker as configured, {w} worker(s) to fit {cores} core(s)"
        if threads > cores:
            why += f" (the threads alone oversubscribe the {cores} usable core(s))"
        return ThreadPlan(w, threads, why)
    return ThreadPlan(cores, 1, f"one worker per usable core ({cores}), one intra-op thread each")


def intra_op_threads(configured: int, workers: int, budget: CpuBudget | None = None) -> int:
    """The intra-op threads one serving process uses: ``configured`` when set, else its share of the usable
    cores among ``workers`` processes (``0``: this process alone)."""
    if configured > 0:
        return configured
    b = budget or read_cpu_budget()
    return plan_threads(b.cores, workers=max(1, workers)).threads
