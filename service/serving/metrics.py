"""Prometheus metrics of one serving process, in a registry of its own (one per app, so tests stay apart).

Names are ``classmeans_*`` in base units (seconds, FLOPs); labels are bounded: model, endpoint (the route
template, or ``unmatched``), HTTP status, profile (names from the bundle and the IC set), exit index, the
rule that let a sample out (``cm``, ``ic``, ``ic+cm``, ``final``), job kind and outcome, rejection reason.
The exit-depth histogram has one bucket per exit index, so ``le="j"`` counts samples that left at exit
``j`` or earlier.

Several processes (``classmeans serve --workers N``): ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at an
empty folder before the workers start, prometheus_client keeps every process's values in files there, and
one scrape of ``/metrics`` on any worker merges them (:func:`render`): counters and histograms add up over
all processes (those of a worker that died included, so rates stay right); each gauge says how it
aggregates (``multiprocess_mode``): in-flight requests and queue depth add up over live processes,
``classmeans_up`` counts the ready ones, and the active state (``classmeans_active_info``,
``classmeans_active_version``) is reported per live process, with a ``pid`` label.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# One series per counter, without the ``*_created`` companions (a process-wide prometheus_client switch).
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FLOPS_BUCKETS = tuple(float(2 ** k) for k in range(16, 41))  # 65 kFLOPs .. 1.1 TFLOPs, factor 2
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
REJECT_REASONS = ("overloaded", "queue_timeout", "deadline", "shed")


class Metrics:
    """All collectors of one app. Thread-safe (prometheus_client is); the worker thread observes too."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("classmeans_requests", "HTTP requests answered, by route template and status.",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("classmeans_request_latency_seconds",
                                 "Wall time from request start to the end of the response.",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("classmeans_queue_wait_seconds",
                                    "Time an inference request waited in the batch queue.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("classmeans_inference_seconds",
                                   "Compute time of one batch through the exit runner.",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("classmeans_batch_size", "Samples per batch run through the network.",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.exit_depth: Histogram | None = None
        self.samples = Counter("classmeans_samples", "Classified samples by the profile that served them, the "
                               "exit index they left at and the rule that let them out (cm, ic, ic+cm, final).",
                               ["model", "profile", "exit", "rule"], registry=r)
        self.member_samples = Counter("classmeans_member_samples", "Samples answered by each member of a cascade "
                                      "of models (exits of the sequence are in classmeans_samples).",
                                      ["model", "member"], registry=r)
        self._last_exit = -1
        self.flops_per_sample = Histogram("classmeans_flops_per_sample",
                                          "FLOPs spent on one sample (2 per multiply-add).",
                                          ["model", "profile"], buckets=FLOPS_BUCKETS, registry=r)
        self.flops_spent = Counter("classmeans_flops_spent", "FLOPs spent on classified samples.", ["model"],
                                   registry=r)
        self.flops_full = Counter("classmeans_flops_full", "FLOPs the full network would have spent on the "
                                  "same samples.", ["model"], registry=r)
        self.flops_saved = Counter("classmeans_flops_saved", "FLOPs saved by early exits (per sample, "
                                   "max(0, full - spent)).", ["model"], registry=r)
        self.flops_overhead = Counter("classmeans_flops_overhead", "FLOPs spent beyond the full network by "
                                      "samples that consulted exits and left at the last one.", ["model"],
                                      registry=r)
        self.rejected = Counter("classmeans_rejected", "Inference requests refused or dropped, by reason "
                                "(overloaded, queue_timeout, deadline, shed).", ["model", "reason"], registry=r)
        self.shed = Counter("classmeans_shed_requests", "Inference requests refused on arrival by the autopilot's "
                            "admission control (503 shed with Retry-After: they could not be answered within the "
                            "latency target).", ["model"], registry=r)
        self.gc_pause = Histogram("classmeans_gc_pause_seconds", "Wall time of each cyclic garbage collection, by "
                                  "generation (every thread waits for it: the GIL is held).", ["model", "generation"],
                                  buckets=GC_BUCKETS, registry=r)
        self._state_collectors(r)
        self._active_labels: tuple[str, str] | None = None
        self.up.labels(model).set(0)
        self.inflight.labels(model).set(0)
        self.queue_depth.labels(model).set(0)
        self.autopilot_enabled.labels(model).set(0)
        self.autopilot_target.labels(model).set(0)
        self.shed.labels(model)
        for gen in ("0", "1", "2"):
            self.gc_pause.labels(model, gen)
        for direction in ("down", "up"):
            self.autopilot_moves.labels(model, direction)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)
        for outcome in ("succeeded", "failed"):
            self.jobs.labels("class_means", outcome)
        for c in (self.flops_spent, self.flops_full, self.flops_saved, self.flops_overhead,
                  self.profile_switches, self.bundle_activations):
            c.labels(model)

    def _state_collectors(self, r: CollectorRegistry) -> None:
        """The gauges of what serves now (merged across worker processes) and the admin counters."""
        self.inflight = Gauge("classmeans_inflight_requests", "HTTP requests being handled (probes and "
                              "/metrics excluded).", ["model"], registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge("classmeans_queue_depth", "Samples waiting in the batch queue.", ["model"],
                                 registry=r, multiprocess_mode="livesum")
        self.active_info = Gauge("classmeans_active_info", "1 for the bundle and profile (operating point) that "
                                 "serve now.", ["model", "bundle", "profile"], registry=r,
                                 multiprocess_mode="liveall")
        self.active_version = Gauge("classmeans_active_version", "Version of the active state (active.json).",
                                    ["model"], registry=r, multiprocess_mode="liveall")
        self.profile_switches = Counter("classmeans_profile_switches", "Operating point changes.", ["model"],
                                        registry=r)
        self.bundle_activations = Counter("classmeans_bundle_activations", "Bundle activations (new bundles "
                                          "and roll-backs).", ["model"], registry=r)
        self.jobs = Counter("classmeans_admin_jobs", "Finished admin jobs by kind and outcome.",
                            ["kind", "outcome"], registry=r)
        self.job_duration = Histogram("classmeans_admin_job_duration_seconds", "Wall time of admin jobs.",
                                      ["kind"], buckets=JOB_BUCKETS, registry=r)
        self.up = Gauge("classmeans_up", "1 when the model is loaded, warmed up and ready (with several worker "
                        "processes: how many are).", ["model"], registry=r, multiprocess_mode="livesum")
        self.autopilot_enabled = Gauge("classmeans_autopilot_enabled", "1 while the latency autopilot steers the "
                                       "operating point of this process (per process: pid label).", ["model"],
                                       registry=r, multiprocess_mode="liveall")
        self.autopilot_flops_fraction = Gauge("classmeans_autopilot_flops_fraction", "FLOPs fraction of the "
                                              "operating point the autopilot holds now in this process (last value "
                                              "once off; per process: pid label).", ["model"], registry=r,
                                              multiprocess_mode="liveall")
        self.autopilot_target = Gauge("classmeans_autopilot_target_seconds", "The autopilot's p99 latency target "
                                      "in this process (0: off; per process: pid label).", ["model"], registry=r,
                                      multiprocess_mode="liveall")
        self.autopilot_budget = Gauge("classmeans_autopilot_budget_fraction", "The autopilot's budget: a fraction of "
                                      "the full network's measured time at batch 1 (time axis) or FLOPs (untimed "
                                      "bundle), per process.", ["model"], registry=r, multiprocess_mode="liveall")
        self.autopilot_moves = Counter("classmeans_autopilot_moves", "Operating point moves made by the autopilot "
                                       "(in memory, no active.json write), by direction (down: cheaper).",
                                       ["model", "direction"], registry=r)

    def configure_exits(self, num_exits: int) -> None:
        """Create the exit-depth histogram (buckets ``0 .. M-1``) once the network's exit count is known."""
        if self.exit_depth is None:
            self.exit_depth = Histogram("classmeans_exit_depth", "Exit index each sample left at (one bucket "
                                        "per exit; the last is the network's own classifier).",
                                        ["model", "profile"], buckets=[float(j) for j in range(num_exits)],
                                        registry=self.registry)
            self._last_exit = num_exits - 1

    def set_active(self, bundle: str, profile: str, version: int) -> None:
        """Point the info gauge at the new (bundle, profile); the old label set is removed."""
        new = (bundle, profile)
        if self._active_labels is not None and self._active_labels != new:
            self.active_info.labels(self.model, *self._active_labels).set(0)  # the multiprocess file keeps it
            with contextlib.suppress(KeyError):
                self.active_info.remove(self.model, *self._active_labels)
        self.active_info.labels(self.model, bundle, profile).set(1)
        self._active_labels = new
        self.active_version.labels(self.model).set(version)

    def observe_samples(self, profiles: Sequence[str], exits: Sequence[int], flops: Sequence[float],
                        flops_full: float, rules: Sequence[str] | None = None,
                        members: Sequence[str] | None = None) -> None:
        """Record one classified sample per entry (called from the inference worker thread). ``rules``:
        the rule per sample; without it (class-means profiles) ``cm``, or ``final`` at the last exit."""
        m = self.model
        spent = 0.0
        saved = 0.0
        overhead = 0.0
        last = self._last_exit
        for i, (prof, j, f) in enumerate(zip(profiles, exits, flops, strict=True)):
            if self.exit_depth is not None:
                self.exit_depth.labels(m, prof).observe(j)
            rule = rules[i] if rules is not None else ("final" if j == last else "cm")
            self.samples.labels(m, prof, str(j), rule).inc()
            self.flops_per_sample.labels(m, prof).observe(f)
            spent += f
            diff = flops_full - f
            if diff >= 0:
                saved += diff
            else:
                overhead -= diff
        for member in members or ():
            self.member_samples.labels(m, member).inc()
        self.flops_spent.labels(m).inc(spent)
        self.flops_full.labels(m).inc(flops_full * len(flops))
        self.flops_saved.labels(m).inc(saved)
        self.flops_overhead.labels(m).inc(overhead)

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        self.gc_pause.labels(self.model, str(generation)).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model, reason).inc()

    def render(self) -> bytes:
        """This process's metrics; in multiprocess mode those of every process of the server."""
        path = multiproc_dir()
        if path is None:
            return generate_latest(self.registry)
        forget_dead_processes(path)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=str(path))
        return generate_latest(merged)


def multiproc_dir() -> Path | None:
    """The multiprocess folder when this process runs in prometheus_client's multiprocess mode."""
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


_PID_RE = re.compile(r"_(\d+)\.db$")


def forget_dead_processes(path: Path) -> None:
    """Drop the live-gauge files of processes that are gone (a worker that died and was replaced), so
    ``live*`` gauges count live processes only; their counters stay (they happened)."""
    pids = {int(m.group(1)) for f in path.glob("*.db") if (m := _PID_RE.search(f.name))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(path))
        except PermissionError:
            continue
