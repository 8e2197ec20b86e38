"""Measure the time axis of an engine on this machine: per-stage, per-head and per-call milliseconds.

For each batch size ``b`` the engine runs, on features of the right shape (the eager network's own
features of random images), ``repeats`` calls of

* every stage alone (``SegmentKey(network, j, j, ())``; the last "stage" is the network's classifier,
  ``SegmentKey(network, M - 1, M - 1, ("final",))``),
* every stage followed by its class-means head (``SegmentKey(network, j, j, ("cm",))``),
* the whole network (``SegmentKey(network, 0, M - 1, ("final",))``),

takes the median per-call seconds of each, and :func:`~service.earlyexit.time_axis.decompose` turns them into
a :class:`~service.earlyexit.time_axis.TimeTable` (per-sample ms of each stage, head and call). The engine is
anything that can run a :class:`~service.serving.compiled.segments.SegmentKey` on an input: the compiled
runner, or :class:`EagerSegments` (the torch reference engine, for GPUs and for comparison).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from service.backbones import StagedNetwork
from service.backbones.cascade_network import CascadeNetwork
from service.earlyexit import ExitHead
from service.earlyexit.modes import CM_HEAD
from service.earlyexit.time_axis import CascadeTimeTable, TimeTable, decompose
from service.serving.compiled.runner import CompiledCascadeRunner
from service.serving.compiled.segments import DEFAULT_NETWORK, FINAL, SegmentKey
from service.serving.compiled.timing import time_call


class SegmentEngine(Protocol):
    """Something that returns a callable running segment ``key`` on an input batch."""

    def segment_callable(self, key: SegmentKey) -> Callable[[torch.Tensor], object]: ...


class EagerSegments:
    """The torch reference engine as segments (eager modules, ``torch.inference_mode``)."""

    def __init__(self, net: StagedNetwork, heads: dict[int, ExitHead]) -> None:
        self.net, self.heads = net.eval(), heads

    def segment_callable(self, key: SegmentKey) -> Callable[[torch.Tensor], object]:
        net, heads = self.net, self.heads
        last = net.num_exits - 1

        @torch.inference_mode()
        def run(x: torch.Tensor) -> object:
            stop = key.end if not key.final else last
            for j in range(key.start, min(stop + 1, last)):
                x = net.stages[j](x)
            if key.final:
                return torch.softmax(net.head(x).float(), 1)
            out = [x]
            if CM_HEAD in key.heads:
                out.append(heads[key.end].probabilities(x))
            return out

        return run


def _seconds(engine: SegmentEngine, key: SegmentKey, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one call of segment ``key`` on ``x`` (the callable is made before the clock starts)."""
    fn = engine.segment_callable(key)
    return time_call(lambda: fn(x), repeats)


@torch.inference_mode()
def stage_inputs(net: StagedNetwork, in_shape: Sequence[int], batch: int, seed: int = 0) -> list[torch.Tensor]:
    """``M`` tensors: the input of every stage (the last: the classifier's input) for ``batch`` random images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *in_shape), generator=g)
    inputs = []
    for stage in net.stages:
        inputs.append(x.contiguous())
        x = stage(x)
    inputs.append(x.contiguous())
    return inputs


def measure_time_tables(net: StagedNetwork, heads: dict[int, ExitHead], engine: SegmentEngine,
                        in_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32), repeats: int = 30,
                        network: str = DEFAULT_NETWORK) -> dict[int, TimeTable]:
    """One :class:`TimeTable` per batch size (module docstring). Exits without a class-means head cost no head."""
    m = net.num_exits
    tables: dict[int, TimeTable] = {}
    for b in batch_sizes:
        xs = stage_inputs(net, in_shape, b)
        reps = max(5, repeats if b == 1 else repeats // 3)
        single, with_head = [], []
        for j in range(m):
            key = SegmentKey(network, j, j, (FINAL,) if j == m - 1 else ())
            single.append(_seconds(engine, key, xs[j], reps))
        for j in range(m - 1):
            if j in heads:
                key = SegmentKey(network, j, j, (CM_HEAD,))
                with_head.append(_seconds(engine, key, xs[j], reps))
            else:
                with_head.append(single[j])
        whole = _seconds(engine, SegmentKey(network, 0, m - 1, (FINAL,)), xs[0], reps)
        ms = 1000.0 / b
        tables[b] = decompose([s * ms for s in single], [h * ms for h in with_head], whole * ms, b)
    return tables


class CompiledSegments:
    """The compiled engine's sessions as segments (built on first use, cached by the runner)."""

    def __init__(self, runner: CompiledCascadeRunner) -> None:
        self.runner = runner

    def segment_callable(self, key: SegmentKey) -> Callable[[torch.Tensor], object]:
        session = self.runner.sessions.get(key)

        def run(x: torch.Tensor) -> object:
            return session.run(None, {"x": x.numpy()})

        return run


def segments_for(runner: object, net: StagedNetwork, heads: dict[int, ExitHead]) -> tuple[SegmentEngine, str]:
    """The segments of the engine ``runner`` is (compiled: its own session cache; else the eager reference)."""
    if isinstance(runner, CompiledCascadeRunner):
        return CompiledSegments(runner), "onnx"
    return EagerSegments(net, heads), "torch"


def segment_engine(name: str, net: StagedNetwork, heads: dict[int, ExitHead], threads: int
                   ) -> tuple[SegmentEngine, str]:
    """The engine to time: ``torch`` (eager reference), ``onnx`` (compiled; raises
    :class:`~service.serving.compiled.errors.EngineBuildError` when it cannot be built) or ``auto`` (compiled,
    falling back to eager with the reason logged), as :func:`~service.serving.compiled.factory.build_runner`."""
    from service.serving.compiled.factory import build_runner

    runner, _info = build_runner(name, net, heads, None, threads=threads)
    return segments_for(runner, net, heads)


def cascade_time_tables(net: CascadeNetwork, heads: dict[int, ExitHead], engines: Sequence[SegmentEngine],
                        in_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32), repeats: int = 30
                        ) -> dict[int, CascadeTimeTable]:
    """A cascade's time axis: every member measured as one network (its own segments, ``engines[i]``), joined
    per batch size (:class:`~service.earlyexit.time_axis.CascadeTimeTable`)."""
    per_member = [measure_time_tables(m.net, net.member_heads(heads, i), engines[i], in_shape, batch_sizes, repeats,
                                      network=_network_of(engines[i])) for i, m in enumerate(net.members)]
    return {b: CascadeTimeTable(tuple(t[b] for t in per_member)) for b in batch_sizes}


def _network_of(engine: SegmentEngine) -> str:
    """The network id a segment engine's keys must carry (a compiled runner's own; eager: any)."""
    runner = getattr(engine, "runner", None)
    return str(getattr(runner, "network", DEFAULT_NETWORK))


def serving_time_tables(runner: object, net: StagedNetwork | CascadeNetwork, heads: dict[int, ExitHead],
                        in_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32), repeats: int = 30
                        ) -> tuple[dict[int, TimeTable] | dict[int, CascadeTimeTable], str]:
    """The time tables of the engine ``runner`` serves with (one network or a cascade), and the engine's name."""
    if isinstance(net, CascadeNetwork):
        runners = getattr(runner, "runners", None) or [None] * net.num_members
        found = [segments_for(r, m.net, net.member_heads(heads, i)) for i, (m, r) in
                 enumerate(zip(net.members, runners, strict=True))]
        names = {n for _, n in found}
        tables = cascade_time_tables(net, heads, [e for e, _ in found], in_shape, batch_sizes, repeats)
        return tables, names.pop() if len(names) == 1 else "mixed"
    engine, name = segments_for(runner, net, heads)
    return measure_time_tables(net, heads, engine, in_shape, batch_sizes, repeats), name
