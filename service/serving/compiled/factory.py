"""Choosing the engine: ``build_runner("auto" | "onnx" | "torch", net, cm_heads, ics, threads)``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from service.backbones import StagedNetwork
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.policy import ExitPolicy
from service.serving.cascade import CascadeRunner
from service.serving.compiled.errors import EngineBuildError
from service.serving.compiled.runner import CompiledCascadeRunner
from service.serving.compiled.segments import SegmentKey

log = logging.getLogger("classmeans.engine")

ENGINES = ("auto", "onnx", "torch")


def build_runner(engine: str, net: StagedNetwork, cm_heads: dict[int, ExitHead], ics: ICSet | None = None,
                 threads: int = 1, policies: Sequence[ExitPolicy] | None = None, **options: Any
                 ) -> tuple[CascadeRunner | CompiledCascadeRunner, dict[str, Any]]:
    """The runner for ``engine`` and what was chosen: ``info = {"engine", "requested", "threads", "reason"}``.

    ``onnx``: a :class:`CompiledCascadeRunner` with every session ``policies`` need built now (without
    ``policies``: the whole network's segment, which compiles every stage); raises :class:`EngineBuildError`
    naming the segment and stage that failed. ``auto``: the same on a CPU network, falling back to the torch
    :class:`CascadeRunner` when it fails (or the network is not on the CPU), with the reason in ``info`` and
    the log. ``torch``: the reference engine. ``options`` go to :class:`CompiledCascadeRunner`.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    info: dict[str, Any] = {"requested": engine, "threads": int(threads), "reason": None}
    if engine == "torch":
        info["engine"] = "torch"
        info["threads"] = torch.get_num_threads()
        return CascadeRunner(net, cm_heads, ics), info
    try:
        runner = CompiledCascadeRunner(net, cm_heads, ics, threads=threads, **options)
        if policies:
            runner.prepare(policies)
        else:
            runner.sessions.get(SegmentKey(runner.network, 0, net.num_exits - 1, ("final",)))
    except EngineBuildError as exc:
        if engine == "onnx":
            raise
        info.update(engine="torch", reason=str(exc), failed_segment=exc.segment, failed_stage=exc.stage,
                    threads=torch.get_num_threads())
        log.warning("compiled engine unavailable, serving with the torch engine: %s", exc)
        return CascadeRunner(net, cm_heads, ics), info
    info.update(runner.info())
    return runner, info
