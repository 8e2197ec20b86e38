"""What ``GET /v2/models/{m}/config`` (Triton's model configuration extension) and ``GET /v2/models/{m}/stats``
(Triton's statistics extension) answer, built from what the server really does and really counted.

Config, in Triton's JSON form of ``config.pbtxt``: ``max_batch_size`` is the most samples one request may
carry (``max_files``); dims exclude that batch dimension, and the per-sample scalars (an encoded image in,
a label out) are ``dims [1]`` with ``reshape {shape: []}``, i.e. a request sends ``[n]`` (or ``[n, 1]``).
``dynamic_batching`` is on: requests are merged into network batches of at most the batcher's
``max_batch_size`` after waiting at most ``max_delay_ms``.

Statistics come from the Prometheus collectors the service keeps anyway: inference requests by status
(``/classify`` and every v2 infer route), samples classified, network batches run with their total compute
time, queue waits with their total; plus what Triton has no field for, samples per (profile, exit, rule).
Triton fields the service does not measure (per-request success time, input/output copy times, cache) are
left out rather than filled with guesses.
"""

from __future__ import annotations

from typing import Any

from service.api.settings import Settings
from service.serving.engine import Engine
from service.serving.metrics import Metrics

INFER_ENDPOINTS = frozenset({"/classify", "/v2/models/{model_name}/infer",
                             "/v2/models/{model_name}/versions/{version}/infer"})


def _scalar(name: str, data_type: str) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": [1], "reshape": {"shape": []}}


def model_config(engine: Engine, settings: Settings) -> dict[str, Any]:
    """Triton's model configuration (JSON) of the served model."""
    h, w = engine.spec.input_size
    k = engine.spec.num_classes
    snap = engine.snapshot
    return {
        "name": engine.spec.name,
        "platform": "pytorch_classmeans",
        "backend": "classmeans",
        "max_batch_size": settings.max_files,
        "input": [
            {**_scalar("image", "TYPE_STRING"), "format": "FORMAT_NONE"},
            {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, h, w]},
        ],
        "output": [
            {**_scalar("label", "TYPE_STRING"), "label_filename": ""},
            _scalar("class_index", "TYPE_INT64"),
            _scalar("confidence", "TYPE_FP32"),
            _scalar("exit_layer", "TYPE_INT64"),
            _scalar("flops", "TYPE_FP64"),
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [k]},
            _scalar("rule", "TYPE_STRING"),
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": round(settings.max_delay_ms * 1000),
                             "preferred_batch_size": [settings.max_batch_size]},
        "version_policy": {"specific": {"versions": [snap.bundle_id]}},
        "instance_group": [{"name": engine.spec.name, "count": 1,
                            "kind": "KIND_GPU" if engine.net.device.type == "cuda" else "KIND_CPU"}],
        "parameters": {
            "bundle": {"string_value": snap.bundle_id},
            "profile": {"string_value": snap.profile_name},
            "network_max_batch_size": {"string_value": str(settings.max_batch_size)},
            "queue_size": {"string_value": str(settings.queue_size)},
            "num_layers": {"string_value": str(snap.bundle.num_exits)},
            "classes": {"string_value": ",".join(engine.spec.classes)},
        },
    }


def _samples(metric: Any) -> list[Any]:
    return [s for family in metric.collect() for s in family.samples]


def _count_ns(hist: Any) -> dict[str, int]:
    count = total = 0.0
    for s in _samples(hist):
        if s.name.endswith("_count"):
            count += s.value
        elif s.name.endswith("_sum"):
            total += s.value
    return {"count": int(count), "ns": round(total * 1e9)}


def model_stats(engine: Engine, metrics: Metrics) -> dict[str, Any]:
    """Triton's statistics (``{"model_stats": [...]}``) of the served model since this process started."""
    ok = fail = 0
    for s in _samples(metrics.requests):
        if s.name.endswith("_total") and s.labels.get("endpoint") in INFER_ENDPOINTS:
            if s.labels.get("status") == "200":
                ok += int(s.value)
            else:
                fail += int(s.value)
    exits = []
    inferences = 0
    for s in _samples(metrics.samples):
        if s.name.endswith("_total") and s.value:
            exits.append({"profile": s.labels["profile"], "exit": int(s.labels["exit"]),
                          "rule": s.labels["rule"], "count": int(s.value)})
            inferences += int(s.value)
    compute = _count_ns(metrics.inference)
    return {"model_stats": [{
        "name": engine.spec.name,
        "version": engine.snapshot.bundle_id,
        "inference_count": inferences,
        "execution_count": compute["count"],
        "inference_stats": {"success": {"count": ok}, "fail": {"count": fail},
                            "queue": _count_ns(metrics.queue_wait), "compute_infer": compute},
        "exit_stats": sorted(exits, key=lambda e: (e["profile"], e["exit"], e["rule"])),
    }]}
