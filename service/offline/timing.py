"""A bundle's profiles on the time axis: measured engine times x exit shares on the selection split.

``timing_document`` joins :class:`~service.earlyexit.time_axis.TimeTable` s measured on the machine that
serves (per batch size) with the class-means decision table of the selection split (Eq. 6-7 applied to every
profile's thresholds): a profile's expected milliseconds per sample at batch ``b`` is the mean, over the
selection samples, of the time of leaving where that sample leaves (:meth:`DecisionTable.evaluate` with the
time costs, exactly as FLOPs are averaged). Written as the bundle's ``timing.json``
(:mod:`service.store.timing`).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

from service.earlyexit import DecisionTable, Profile
from service.earlyexit.search import search_thresholds
from service.earlyexit.time_axis import TimeTable, profile_time_entry
from service.offline.calibration import profiles_from_search, restrict_to_heads
from service.store.bundle_model import Bundle


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_times(bundle: Bundle, table: DecisionTable, tables: dict[int, TimeTable]) -> dict[str, dict[str, Any]]:
    """Per profile: ``ms`` and ``time_fraction`` per batch size, and its ``exit_share (M,)`` on the table."""
    return {p.name: profile_time_entry(table.exit_histogram(torch.tensor(p.thresholds)), p.thresholds, tables)
            for p in bundle.profiles}


def timing_document(bundle: Bundle, table: DecisionTable, tables: dict[int, TimeTable], engine: str, threads: int,
                    selection: dict[str, Any]) -> dict[str, Any]:
    """The bundle's ``timing.json`` (format in :mod:`service.store.timing`)."""
    return {"bundle": bundle.bundle_id, "engine": engine, "threads": threads, "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "tables": {str(b): tt.to_json() for b, tt in tables.items()},
            "full_ms": {str(b): round(tt.full_ms, 6) for b, tt in tables.items()},
            "selection": selection, "profiles": profile_times(bundle, table, tables)}


def time_hull_bundle(bundle: Bundle, table: DecisionTable, latency: TimeTable, bundle_id: str, search: str = "refine",
                     samples: int = 10_000, seed: int = 0, tolerance: float = 0.005) -> Bundle:
    """The same heads with thresholds searched on the accuracy-*time* plane (``--cost time``).

    The search (:func:`~service.earlyexit.search.search_thresholds`) charges every candidate the measured
    milliseconds of ``latency`` (batch 1) instead of FLOPs, so an exit whose head and extra call cost more
    time than the samples it lets out save is left disabled, and the hull is the accuracy-time hull. The
    profiles keep FLOPs as their cost fields (re-costed with the bundle's FLOPs table, for comparison with the
    paper); their selection-split milliseconds are in ``extra.selection_ms``; the default profile is the
    fastest one within ``tolerance`` of the full network's accuracy.
    """
    costs_ms = latency.exit_costs()
    missing = [j for j in range(bundle.num_exits - 1) if j not in bundle.heads]
    table = restrict_to_heads(table, bundle.heads, bundle.num_exits)  # exits without means never fire
    result = search_thresholds(table, costs_ms, search, samples, seed)
    result.thresholds[:, missing] = 1.0
    timed, default = profiles_from_search(result, costs_ms, tolerance)  # cost fields in ms here
    t = torch.tensor([p.thresholds for p in timed], dtype=torch.float32)
    flops, _ = table.evaluate(t, bundle.costs)
    full = bundle.costs.full
    profiles = [Profile(p.name, p.thresholds, float(f), float(f) / full, p.accuracy,
                        extra={**p.extra, "selection_ms": round(p.flops, 6), "cost": "time"})
                for p, f in zip(timed, flops.tolist(), strict=True)]
    config = {**bundle.config, "cost": "time", "search": search, "samples": samples, "seed": seed,
              "tolerance": tolerance, "time_search_of": bundle.bundle_id}
    meta = {k: v for k, v in bundle.meta.items() if k in ("estimate", "calibration_processes")}
    return Bundle(bundle_id, bundle.heads, bundle.costs, bundle.exit_names, bundle.exit_shapes, profiles, default,
                  config=config, report={}, meta=meta)
