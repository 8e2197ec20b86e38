"""Export one segment to ONNX (in memory) and load it into an ONNX Runtime session, checked.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-tracing exporter, still shipped by torch
2.14 (it warns that it is deprecated; the dynamo exporter would need ``onnxscript``). Opset
:data:`OPSET`, constants folded, one dynamic batch axis on the input and every output, written to a
``BytesIO`` (no file). Tracing records what a module *did* on the example input, so a stage that leaves
torch (a numpy call) would be baked in as a constant: every session is therefore *validated* before use --
run on fresh random inputs at batch 3 and 1 and compared with the eager modules it came from
(:data:`CHECK_RTOL`). Any failure (export, load, validation) raises
:class:`~service.serving.compiled.errors.EngineBuildError` naming the segment and, found by compiling its
stages one at a time, the first stage that fails alone.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.serving.compiled.errors import EngineBuildError
from service.serving.compiled.segments import SegmentKey

OPSET = 17
CHECK_RTOL = 1e-3  # validation: max |onnx - eager| <= CHECK_RTOL * max(1, max |eager|) per output
PROBE_BATCH = 3


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime settings for every session: ``intra_op_threads`` per call, one inter-op thread, no
    spinning (the serving event loop shares the core), all graph optimisations, sequential execution."""

    intra_op_threads: int = 1
    optimization: str = "all"

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(self.intra_op_threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[self.optimization]
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so


class SegmentModule(nn.Module):
    """Stages in order, then either the heads at the exit (``feature`` plus each head's ``(B, K)``
    probabilities) or the network head's softmax (``final``). The stages are the network's own modules."""

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module] = (), final: nn.Module | None = None,
                 owner: nn.Module | None = None) -> None:
        super().__init__()
        # Stages may hold their layers outside the module tree (``Sequence_``): ``owner`` (the whole network)
        # makes every parameter one of this module's, so the tracer sees parameters, not constants; the
        # exporter keeps only the initializers the graph uses.
        self.owner = owner
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.final = final

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for stage in self.stages:
            x = stage(x)
        if self.final is not None:
            return (self.final(x),)
        return (x, *(h(x) for h in self.heads))


_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: one export at a time per process


def export_bytes(module: nn.Module, in_shape: tuple[int, ...], outputs: list[str]) -> bytes:
    """The ONNX model of ``module`` for inputs ``(B, *in_shape)`` float32 (dynamic ``B``). Exports are serialised
    across threads: two at once (the background builders of a cascade's members) fail with
    ``GLOBALS.in_onnx_export must be False`` (seen in the log of the default cascade)."""
    example = torch.randn((2, *in_shape), generator=torch.Generator().manual_seed(7))
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in ["x", *outputs]}
    with _EXPORT_LOCK, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, dynamo=False, opset_version=OPSET, input_names=["x"],
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    return buf.getvalue()


def load_session(model: bytes, config: SessionConfig) -> ort.InferenceSession:
    return ort.InferenceSession(model, sess_options=config.options(), providers=["CPUExecutionProvider"])


def validate(session: ort.InferenceSession, module: nn.Module, in_shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless the session reproduces ``module`` on fresh random inputs: one eager pass at
    batch :data:`PROBE_BATCH`, compared with the session at that batch and, on its first row, at batch 1 (rows
    are independent in eval mode), so the dynamic batch axis is checked at two sizes other than the export's."""
    names = [i.name for i in session.get_inputs()]
    if names != ["x"]:
        raise ValueError(f"the exported graph does not read its input (inputs {names}): a stage left torch "
                         "(numpy or Python code) and was traced as a constant")
    x = torch.randn((PROBE_BATCH, *in_shape), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = [w.detach().float().numpy() for w in module(x)]
    for b in (PROBE_BATCH, 1):
        got = session.run(None, {"x": x[:b].numpy()})
        if len(got) != len(want):
            raise ValueError(f"{len(got)} outputs, expected {len(want)}")
        for g, w_all in zip(got, want, strict=True):
            w = w_all[:b]
            if g.shape != w.shape:
                raise ValueError(f"output shape {g.shape} at batch {b}, expected {w.shape}")
            err = float(np.max(np.abs(g - w))) if g.size else 0.0
            tol = CHECK_RTOL * max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)
            if not err <= tol:
                raise ValueError(f"output differs from the eager module by {err:.3g} (> {tol:.3g}) at batch {b}")


def compile_module(module: nn.Module, in_shape: tuple[int, ...], outputs: list[str], config: SessionConfig
                   ) -> ort.InferenceSession:
    """Export, load and validate; any failure raises (the caller turns it into an ``EngineBuildError``)."""
    module.eval()
    session = load_session(export_bytes(module, in_shape, outputs), config)
    validate(session, module, in_shape)
    return session


def build_segment(key: SegmentKey, module: SegmentModule, in_shape: tuple[int, ...], stage_names: Sequence[str],
                  stage_shapes: Sequence[tuple[int, ...]], config: SessionConfig) -> ort.InferenceSession:
    """The validated session of segment ``key``; ``stage_shapes[i]`` is the input shape of the segment's
    ``i``-th stage (``in_shape`` for the first). Raises :class:`EngineBuildError`."""
    try:
        return compile_module(module, in_shape, key.output_names(), config)
    except Exception as exc:  # export, ORT load or validation
        reason = f"{type(exc).__name__}: {_short(exc)}"
        culprit = _culprit(module, stage_names, stage_shapes, config)
        where = f"stage {culprit!r}" if culprit else "its head(s)" if culprit is None else "the whole segment"
        raise EngineBuildError(f"cannot compile segment {key.label()} to ONNX: {where} failed ({reason})",
                               segment=key.label(), stage=culprit or None) from exc


def _culprit(module: SegmentModule, names: Sequence[str], shapes: Sequence[tuple[int, ...]], config: SessionConfig
             ) -> str | None:
    """The first stage that does not compile alone; ``None`` when every stage does (then the heads failed)."""
    for stage, name, shape in zip(module.stages, names, shapes, strict=True):
        try:
            compile_module(SegmentModule([stage], owner=module.owner), shape, ["feature"], config)
        except Exception:
            return name
    return None if (len(module.heads) or module.final is not None) else ""


def _short(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
