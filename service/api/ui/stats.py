"""Live figures for the operator's page: the whole server's, merged over its worker processes.

The numbers come from prometheus_client's public ``collect()`` (the same values ``/metrics`` exposes, without
rendering and re-parsing text), plus the engine's snapshot for exit names and costs. With several workers
(``PROMETHEUS_MULTIPROC_DIR`` set, :func:`~service.serving.metrics.multiproc_dir`) they are read from a
registry that merges every process's files, as a ``/metrics`` scrape does (``scope`` ``"server"``): counters
add up over all processes, queue depth and in-flight requests over the live ones, ``processes`` counts the
ready ones. With one process they are its own collectors (``scope`` ``"process"``). Counters are totals; the
page turns two polls into rates (``Δcount / Δclock_s``, a wall clock every worker shares) and restarts its
baseline when ``instance`` changes (a restart, or another server).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from typing import Any, Literal

from prometheus_client import CollectorRegistry, multiprocess
from pydantic import BaseModel, Field

from service.serving.engine import Engine
from service.serving.metrics import Metrics, forget_dead_processes, multiproc_dir

INSTANCE = secrets.token_hex(6)  # one per process: tells the page that another process answered
_STARTED = time.monotonic()


class ExitCount(BaseModel):
    index: int
    name: str
    flops_fraction: float = Field(description="backbone FLOPs up to this exit / FLOPs of the full network")
    samples: int = Field(description="samples that left at this exit since the process started")


class Requests(BaseModel):
    inference: int = Field(description="answered inference requests (POST /classify and OIP v2 .../infer)")
    inference_errors: int = Field(description="of those, answered with a 4xx or 5xx status")


class Flops(BaseModel):
    spent: float = Field(description="FLOPs spent on classified samples (2 per multiply-add)")
    full: float = Field(description="FLOPs the full network would have spent on the same samples")


class UiStats(BaseModel):
    model: str
    bundle: str
    profile: str = Field(description="the operating point that serves now (a profile, or a~b@lam for a mix)")
    version: int
    scope: Literal["server", "process"] = Field(
        "process", description="server: merged over every worker process (PROMETHEUS_MULTIPROC_DIR); process: "
                               "this process's own counters (one worker)")
    processes: int = Field(1, description="ready worker processes the figures cover")
    instance: str = Field(description="id of the server (scope server: the same from every worker) or of the "
                                      "answering process; rates restart when it changes")
    uptime_s: float = Field(description="seconds since the answering process started (monotonic)")
    clock_s: float = Field(0.0, description="wall-clock seconds (shared by every worker): rates are "
                                            "Δcount / Δclock_s")
    samples: int = Field(description="classified samples (all workers with scope server)")
    exits: list[ExitCount]
    rules: dict[str, int] = Field(description="samples by the rule that let them out: cm, ic, ic+cm, final")
    requests: Requests
    rejected: dict[str, int] = Field(description="inference requests refused or dropped, by reason")
    flops: Flops
    queue_depth: float
    inflight: float = Field(description="HTTP requests being handled, this poll excluded")


class Families:
    """Every sample of a registry's ``collect()``, by sample name (``classmeans_requests_total``, ...)."""

    def __init__(self, registry: Any) -> None:
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in registry.collect():
            for s in family.samples:
                self.by_name.setdefault(s.name, []).append((s.labels, float(s.value)))

    def samples(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        yield from self.by_name.get(name, [])

    def total(self, name: str) -> float:
        return sum(v for _, v in self.samples(name))


def server_families(metrics: Metrics) -> tuple[Families, bool]:
    """The figures' source: the merged multiprocess registry when ``PROMETHEUS_MULTIPROC_DIR`` is set
    (True), else this process's own registry (False)."""
    path = multiproc_dir()
    if path is None or not path.is_dir():
        return Families(metrics.registry), False
    forget_dead_processes(path)
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=str(path))
    return Families(merged), True


def is_inference(endpoint: str) -> bool:
    """The data-plane routes whose rate the page shows (not probes, scrapes, the page's own polls)."""
    return endpoint == "/classify" or endpoint.endswith("/infer")


def _requests(f: Families) -> Requests:
    total = errors = 0
    for labels, value in f.samples("classmeans_requests_total"):
        if is_inference(labels.get("endpoint", "")):
            total += int(value)
            if labels.get("status", "").startswith(("4", "5")):
                errors += int(value)
    return Requests(inference=total, inference_errors=errors)


def _by_exit_and_rule(f: Families, num_exits: int) -> tuple[list[int], dict[str, int]]:
    per_exit = [0] * num_exits
    rules: dict[str, int] = {}
    for labels, value in f.samples("classmeans_samples_total"):
        n = int(value)
        j = int(labels.get("exit", "-1"))
        if 0 <= j < num_exits:
            per_exit[j] += n
        rule = labels.get("rule", "")
        rules[rule] = rules.get(rule, 0) + n
    return per_exit, rules


def collect_stats(metrics: Metrics, engine: Engine) -> UiStats:
    """One consistent-enough reading of the counters (each collector is read once, without a global lock)."""
    f, merged = server_families(metrics)
    snap = engine.snapshot
    bundle = snap.bundle
    costs = bundle.costs
    full = float(costs.full) or 1.0
    per_exit, rules = _by_exit_and_rule(f, bundle.num_exits)
    exits = [ExitCount(index=j, name=name, flops_fraction=float(costs.backbone_cum[j]) / full, samples=per_exit[j])
             for j, name in enumerate(bundle.exit_names)]
    rejected: dict[str, int] = {}
    for labels, v in f.samples("classmeans_rejected_total"):
        reason = labels.get("reason", "")
        rejected[reason] = rejected.get(reason, 0) + int(v)
    path = multiproc_dir()
    instance = ("server-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]) if merged else INSTANCE
    return UiStats(model=engine.spec.name, bundle=snap.bundle_id, profile=snap.profile_name, version=snap.version,
                   scope="server" if merged else "process",
                   processes=max(1, int(f.total("classmeans_up"))) if merged else 1,
                   instance=instance, uptime_s=time.monotonic() - _STARTED, clock_s=time.time(),
                   samples=sum(per_exit), exits=exits, rules=rules, requests=_requests(f), rejected=rejected,
                   flops=Flops(spent=f.total("classmeans_flops_spent_total"),
                               full=f.total("classmeans_flops_full_total")),
                   queue_depth=f.total("classmeans_queue_depth"),
                   inflight=max(0.0, f.total("classmeans_inflight_requests") - 1.0))
