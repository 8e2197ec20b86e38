"""Which engine runs a catalog's cascade: the compiled ONNX Runtime engine (CPU default) or torch eager.

``RunnerOptions.engine``:

* ``auto`` (``classmeans serve``'s default): the compiled engine (service/serving/compiled/) on a CPU network;
  when a segment cannot be exported or fails validation it serves with the torch reference engine instead,
  the reason logged and shown in ``GET /v2/models/{m}`` (``parameters.engine``);
* ``onnx``: the compiled engine or nothing: a network that cannot be compiled fails at start (or the bundle
  activation fails), naming the segment and the stage;
* ``torch``: the reference engine (exact, any device).

The sessions of the profiles named in ``warm`` (the operating point about to serve) are built before the
catalog is returned, on the thread that builds it (start-up, or the admin thread of an activation: never a
request's); every other class-means profile's sessions are built on a background thread, and until they
are, a batch that needs one is answered by the reference engine (same answers, no stall).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.backbones import StagedNetwork
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.policy import ExitPolicy
from service.serving.cascade import CascadeRunner
from service.serving.compiled import CompiledCascadeRunner, build_runner

ENGINES = ("auto", "onnx", "torch")


@dataclass(frozen=True)
class RunnerOptions:
    """``engine`` (:data:`ENGINES`), ORT intra-op ``threads`` per call, ``on_failure`` of a compiled call at
    run time (``reference``: re-run the batch on the torch engine; ``raise``: the batch fails with
    ``engine_failed``, 503)."""

    engine: str = "torch"
    threads: int = 1
    on_failure: str = "reference"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; use one of {ENGINES}")


def make_runner(options: RunnerOptions, net: StagedNetwork, heads: dict[int, ExitHead], ics: ICSet | None,
                warm: Sequence[ExitPolicy], background: Sequence[ExitPolicy]
                ) -> tuple[CascadeRunner | CompiledCascadeRunner, dict[str, Any]]:
    """The runner and what was chosen (``{"engine", "requested", "threads", "reason", ...}``)."""
    if options.engine == "torch":
        return build_runner("torch", net, heads, ics)
    runner, info = build_runner(options.engine, net, heads, ics, threads=options.threads, policies=list(warm),
                                missing="reference", on_failure=options.on_failure)
    if isinstance(runner, CompiledCascadeRunner):
        keys = [k for p in background for k in runner.plan(p).segment_keys()]
        runner.builder.request(keys)
    return runner, info
