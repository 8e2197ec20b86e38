"""Measured time per segment: what the time axis (issue 23 part 2) is built from.

:func:`measure_segment_times` times every session the given policies use, at each batch size, on random
inputs of the segment's shape: the median of ``repeats`` calls after ``warmup`` calls, in seconds per call
(divide by the batch size for seconds per sample). Heads' own time is the difference between a segment with
heads and the same stages without (``include_bare=True`` measures the bare twins too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from service.earlyexit.policy import ExitPolicy
from service.serving.compiled.runner import CompiledCascadeRunner
from service.serving.compiled.segments import SegmentKey


def time_call(fn: Any, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_segment_times(runner: CompiledCascadeRunner, policies: Sequence[ExitPolicy],
                          batch_sizes: Sequence[int] = (1, 32), repeats: int = 20, warmup: int = 2,
                          include_bare: bool = False, seed: int = 0) -> dict[str, Any]:
    """``{"batch_sizes", "repeats", "threads", "segments": {label: {"network", "start", "end", "heads",
    "seconds": {batch: median seconds per call}}}}`` for every segment the policies' plans use (and, with
    ``include_bare``, each non-final segment without its heads)."""
    keys: list[SegmentKey] = []
    for p in policies:
        for k in runner.plan(p).segment_keys():
            if k not in keys:
                keys.append(k)
    if include_bare:
        keys += [b for b in (replace(k, heads=()) for k in keys if not k.final) if b not in keys]
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"batch_sizes": [int(b) for b in batch_sizes], "repeats": int(repeats),
                           "threads": runner.config.intra_op_threads, "segments": {}}
    for key in keys:
        session = runner.sessions.get(key)
        row: dict[str, Any] = {"network": key.network, "start": key.start, "end": key.end,
                               "heads": list(key.heads), "seconds": {}}
        for b in batch_sizes:
            x = rng.standard_normal((int(b), *runner.input_shape(key)), dtype=np.float32)
            row["seconds"][int(b)] = time_call(lambda s=session, x=x: s.run(None, {"x": x}), repeats, warmup)
        out["segments"][key.label()] = row
    return out
