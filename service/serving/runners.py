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
request's). Any other profile's sessions are built on a background thread when a batch first needs them
(``prebuild="served"``, the default), or all the bundle's class-means profiles' right away (``"all"``); until
they are, such a batch is answered by the reference engine (same answers, no stall). Building everything at
once costs every process tens of seconds of CPU, and the exporter (torch tracing) holds the GIL in long
stretches: measured under 32 clients, five activations in 20 s with ``"all"`` cut throughput by half and
multiplied p99 by 4.8 (docs/activation_load.json), so only what traffic asks for is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.backbones import StagedNetwork
from service.backbones.cascade_network import CascadeNetwork
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.policy import ExitPolicy
from service.serving.cascade import CascadeRunner
from service.serving.compiled import CompiledCascadeRunner, build_runner
from service.serving.model_cascade_runner import ModelCascadeRunner

ENGINES = ("auto", "onnx", "torch")
PREBUILD = ("served", "all")


@dataclass(frozen=True)
class RunnerOptions:
    """``engine`` (:data:`ENGINES`), ORT intra-op ``threads`` per call, ``on_failure`` of a compiled call at
    run time (``reference``: re-run the batch on the torch engine; ``raise``: the batch fails with
    ``engine_failed``, 503), ``prebuild`` (:data:`PREBUILD`, module docstring)."""

    engine: str = "torch"
    threads: int = 1
    on_failure: str = "reference"
    prebuild: str = "served"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; use one of {ENGINES}")
        if self.prebuild not in PREBUILD:
            raise ValueError(f"prebuild must be one of {PREBUILD}")


def make_runner(options: RunnerOptions, net: StagedNetwork | CascadeNetwork, heads: dict[int, ExitHead],
                ics: ICSet | None, warm: Sequence[ExitPolicy], background: Sequence[ExitPolicy]
                ) -> tuple[CascadeRunner | CompiledCascadeRunner | ModelCascadeRunner, dict[str, Any]]:
    """The runner and what was chosen (``{"engine", "requested", "threads", "reason", ...}``); a cascade of
    networks gets one runner per member (each chosen as for one network) behind a :class:`ModelCascadeRunner`."""
    if isinstance(net, CascadeNetwork):
        return _cascade_runner(options, net, heads, warm, background)
    if options.engine == "torch":
        return build_runner("torch", net, heads, ics)
    runner, info = build_runner(options.engine, net, heads, ics, threads=options.threads, policies=list(warm),
                                missing="reference", on_failure=options.on_failure)
    if options.prebuild == "all":
        request_builds(runner, background)
    return runner, info


def request_builds(runner: CascadeRunner | CompiledCascadeRunner | ModelCascadeRunner,
                   policies: Sequence[ExitPolicy]) -> int:
    """Ask the compiled engine(s) behind ``runner`` to build the sessions ``policies`` run, in the
    background (returns at once); the number of segment keys asked for (0: nothing compiled to build)."""
    if isinstance(runner, ModelCascadeRunner):
        return sum(request_builds(r, runner.member_policies(policies, i))  # type: ignore[arg-type]
                   for i, r in enumerate(runner.runners))
    if not isinstance(runner, CompiledCascadeRunner):
        return 0
    keys = list(dict.fromkeys(k for p in policies for k in runner.plan(p).segment_keys()))
    runner.builder.request(keys)
    return len(keys)


def _cascade_runner(options: RunnerOptions, net: CascadeNetwork, heads: dict[int, ExitHead],
                    warm: Sequence[ExitPolicy], background: Sequence[ExitPolicy]
                    ) -> tuple[ModelCascadeRunner, dict[str, Any]]:
    """Member ``i`` gets the heads of its early exits (re-indexed to its own exits) and the member policies of
    ``warm`` and ``background`` that run it. The reported engine is the members' when they agree."""
    runner = ModelCascadeRunner(net)
    members, infos = [], {}
    for i, m in enumerate(net.members):
        r, info = make_runner(options, m.net, net.member_heads(heads, i), None, runner.member_policies(warm, i),
                              runner.member_policies(background, i))
        members.append(r)
        infos[m.name] = info
    runner.runners = members
    engines = {str(i.get("engine")) for i in infos.values()}
    return runner, {"engine": engines.pop() if len(engines) == 1 else "mixed", "requested": options.engine,
                    "threads": options.threads, "reason": None, "members": infos}
