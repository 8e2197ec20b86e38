"""The compiled execution engine (ONNX Runtime) for the cascade; the torch :class:`CascadeRunner` stays the
reference engine. See :mod:`.segments` (what one call computes, multi-network keys), :mod:`.fused_heads`
(Eq. 3-5 folded into constants), :mod:`.export` (exporter, validation, session options), :mod:`.runner`
(the runner), :mod:`.factory` (engine choice with fallback) and :mod:`.timing` (per-segment time)."""

import os

# ONNX Runtime (>= 1.29) initialises telemetry when imported and writes a device id and an SQLite file under
# $XDG_CACHE_HOME/Microsoft/DeveloperTools (~/.cache): a server must not write outside its volume and /tmp, nor
# report usage. Off unless the operator asks for it; set before the first `import onnxruntime` (every module of
# this package imports it after this line runs).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from service.serving.compiled.errors import EngineBuildError, EngineFailed
from service.serving.compiled.factory import ENGINES, build_runner
from service.serving.compiled.runner import CompiledCascadeRunner
from service.serving.compiled.segments import SegmentKey, SegmentPlan, plan_for
from service.serving.compiled.timing import measure_segment_times

__all__ = ["ENGINES", "CompiledCascadeRunner", "EngineBuildError", "EngineFailed", "SegmentKey", "SegmentPlan",
           "build_runner", "measure_segment_times", "plan_for"]
