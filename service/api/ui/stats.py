"""Live figures for the operator's page, read from this process's own collectors.

The numbers come from the :class:`~service.serving.metrics.Metrics` objects through prometheus_client's public
``collect()`` (the same values ``/metrics`` exposes, without rendering and re-parsing text), plus the engine's
snapshot for exit names and costs. Counters are totals since this process started; the page turns two polls
into rates (``Δcount / Δuptime_s``) and restarts its baseline when ``instance`` changes (another process or a
restart answered).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field

from service.serving.engine import Engine
from service.serving.metrics import Metrics

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
    instance: str = Field(description="random id of the answering process (rates restart when it changes)")
    uptime_s: float = Field(description="seconds since this process started (monotonic)")
    samples: int = Field(description="classified samples since the process started")
    exits: list[ExitCount]
    rules: dict[str, int] = Field(description="samples by the rule that let them out: cm, ic, ic+cm, final")
    requests: Requests
    rejected: dict[str, int] = Field(description="inference requests refused or dropped, by reason")
    flops: Flops
    queue_depth: float
    inflight: float = Field(description="HTTP requests being handled, this poll excluded")


def _samples(collector: Any, suffix: str = "") -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of a collector whose name ends with ``suffix``."""
    for family in collector.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                yield s.labels, float(s.value)


def _total(collector: Any) -> float:
    return sum(v for _, v in _samples(collector, "_total"))


def _gauge(collector: Any) -> float:
    return sum(v for _, v in _samples(collector))


def is_inference(endpoint: str) -> bool:
    """The data-plane routes whose rate the page shows (not probes, scrapes, the page's own polls)."""
    return endpoint == "/classify" or endpoint.endswith("/infer")


def _requests(metrics: Metrics) -> Requests:
    total = errors = 0
    for labels, value in _samples(metrics.requests, "_total"):
        if is_inference(labels.get("endpoint", "")):
            total += int(value)
            if labels.get("status", "").startswith(("4", "5")):
                errors += int(value)
    return Requests(inference=total, inference_errors=errors)


def _by_exit_and_rule(metrics: Metrics, num_exits: int) -> tuple[list[int], dict[str, int]]:
    per_exit = [0] * num_exits
    rules: dict[str, int] = {}
    for labels, value in _samples(metrics.samples, "_total"):
        n = int(value)
        j = int(labels.get("exit", "-1"))
        if 0 <= j < num_exits:
            per_exit[j] += n
        rule = labels.get("rule", "")
        rules[rule] = rules.get(rule, 0) + n
    return per_exit, rules


def collect_stats(metrics: Metrics, engine: Engine) -> UiStats:
    """One consistent-enough reading of the counters (each collector is read once, without a global lock)."""
    snap = engine.snapshot
    bundle = snap.bundle
    costs = bundle.costs
    full = float(costs.full) or 1.0
    per_exit, rules = _by_exit_and_rule(metrics, bundle.num_exits)
    exits = [ExitCount(index=j, name=name, flops_fraction=float(costs.backbone_cum[j]) / full, samples=per_exit[j])
             for j, name in enumerate(bundle.exit_names)]
    rejected = {labels.get("reason", ""): int(v) for labels, v in _samples(metrics.rejected, "_total")}
    return UiStats(model=engine.spec.name, bundle=snap.bundle_id, profile=snap.profile_name, version=snap.version,
                   instance=INSTANCE, uptime_s=time.monotonic() - _STARTED, samples=sum(per_exit), exits=exits,
                   rules=rules, requests=_requests(metrics), rejected=rejected,
                   flops=Flops(spent=_total(metrics.flops_spent), full=_total(metrics.flops_full)),
                   queue_depth=_gauge(metrics.queue_depth),
                   inflight=max(0.0, _gauge(metrics.inflight) - 1.0))
