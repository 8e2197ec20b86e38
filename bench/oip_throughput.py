"""OIP v2 throughput: the binary tensor extension vs JSON, at 32 concurrent clients, one server, one run.

``python -m bench.oip_throughput [--out docs/oip_throughput.json]`` starts one ``classmeans serve`` on the
default model (``model_store/cifar10-resnet20``) on 127.0.0.1 and sends real CIFAR-10 test images
(``../shared/datasets/cifar10/test.npz``, PNG-encoded with Pillow) as

- ``oip_binary_png``: ``BYTES`` images in binary form (4-byte length + PNG after the JSON header), binary outputs;
- ``oip_json_base64_png``: the same PNGs as base64 strings in JSON, JSON outputs;
- ``oip_binary_fp32``: the decoded, normalised pixels as a binary ``FP32 [1, 3, 32, 32]`` tensor, binary outputs;
- ``oip_json_list_fp32``: the same tensor as a JSON list of 3072 numbers, JSON outputs;
- ``classify_raw_png``: ``POST /classify`` with the raw PNG (this service's own route, for scale).

Each request carries one image and asks for ``class_index``, ``exit_layer`` and ``flops``. Rounds are
interleaved (every variant once per round, the order rotated each round) so background load on the shared
machine falls on all variants alike; a variant's throughput is the median of its rounds, and each ratio is
given three ways: of the medians, the median of the per-round ratios (neighbours in time), and of the server's
CPU time per request (the least sensitive to other users of the machine). Request bodies are
built before the clock starts, so the figures are the server's cost plus a cheap raw-socket client's.
Every answer is checked: status 200 and a class index; the fraction that matches the image's label is the
accuracy, equal across variants when they classify alike.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import ImageSet, load_images
from bench.loadgen import Answer, AnyResponse, ClassmeansTarget, merge_rounds, run_load
from bench.servers import REPO, classmeans_server
from service.backbones.preprocess import Normalizer

OUTPUTS = ("class_index", "exit_layer", "flops")
MODEL = "cifar10-resnet20"


def _model_json() -> dict[str, Any]:
    return json.loads((REPO / "model_store" / MODEL / "model.json").read_text())


@dataclass
class OipTarget:
    """``POST /v2/models/{m}/infer`` with one image as ``kind`` (``png`` or ``fp32``), binary or JSON."""

    name: str
    kind: str
    binary: bool
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    _cache: dict[int, tuple[bytes, dict[str, str]]] = field(default_factory=dict, repr=False)

    def prepare(self, images: ImageSet) -> None:
        for i in range(len(images)):
            self._cache[i] = self._build(images, i)

    def _tensor(self, images: ImageSet, i: int) -> np.ndarray:
        """The server's own normalisation of the decoded image, ``(1, 3, H, W)`` little-endian float32."""
        x = Normalizer(tuple(self.mean), tuple(self.std))(images.pixels[i:i + 1]).numpy()
        return np.ascontiguousarray(x, dtype="<f4")

    def _build(self, images: ImageSet, i: int) -> tuple[bytes, dict[str, str]]:
        outputs = [{"name": o, "parameters": {"binary_data": self.binary}} for o in OUTPUTS]
        if self.kind == "png":
            png = images.pngs[i]
            inp: dict[str, Any] = {"name": "image", "shape": [1], "datatype": "BYTES"}
            raw = struct.pack("<I", len(png)) + png
            data: Any = [base64.b64encode(png).decode()]
        else:
            x = self._tensor(images, i)
            inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
            raw = x.tobytes()
            data = x.ravel().tolist()
        if not self.binary:
            body = json.dumps({"inputs": [{**inp, "data": data}], "outputs": outputs}).encode()
            return body, {"Content-Type": "application/json"}
        head = json.dumps({"inputs": [{**inp, "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": outputs}).encode()
        return head + raw, {"Content-Type": "application/octet-stream",
                            "Inference-Header-Content-Length": str(len(head))}

    def request(self, images: ImageSet, i: int) -> dict[str, Any]:
        body, headers = self._cache[i]
        return {"method": "POST", "url": f"/v2/models/{MODEL}/infer", "content": body, "headers": headers}

    def parse(self, response: AnyResponse) -> Answer:
        n = response.headers.get("inference-header-content-length")
        content = response.content
        head = json.loads(content if n is None else content[:int(n)])
        p = head["parameters"]
        out = {o["name"]: o for o in head["outputs"]}
        cls = out["class_index"]
        if "data" in cls:
            class_index = int(cls["data"][0])
        else:  # binary outputs follow the header in the order of head["outputs"]
            offset = int(n or 0)
            for o in head["outputs"]:
                if o["name"] == "class_index":
                    break
                offset += o["parameters"]["binary_data_size"]
            (class_index,) = struct.unpack_from("<q", content, offset)
        return Answer(class_index, int(p["exit_layer"]), float(p["flops_fraction"]), p["bundle"], p["profile"],
                      int(p["version"]))


def _median(values: Any) -> float:
    return float(np.median(list(values)))


def _cpu_ms(report: dict[str, Any]) -> float:
    """Server CPU milliseconds per answered request in one round (process tree, from /proc)."""
    cpu_s = report["resources"]["server_cpu_percent"] / 100 * report["window_seconds"]
    return 1000 * cpu_s / max(1, report["counts"]["ok_2xx"])


def run(out: Path, rounds: int, requests: int, warmup: int, concurrency: int, images_n: int) -> dict[str, Any]:
    images = load_images(images_n)
    spec = _model_json()
    mean, std = spec["input"]["mean"], spec["input"]["std"]
    targets: list[Any] = [
        OipTarget("oip_binary_png", "png", True), OipTarget("oip_json_base64_png", "png", False),
        OipTarget("oip_binary_fp32", "fp32", True, mean, std), OipTarget("oip_json_list_fp32", "fp32", False,
                                                                         mean, std),
        ClassmeansTarget(name="classify_raw_png")]
    for t in targets:
        if isinstance(t, OipTarget):
            t.prepare(images)
    body_bytes = {t.name: float(np.mean([len(t._cache[i][0]) for i in range(len(images))]))
                  for t in targets if isinstance(t, OipTarget)}
    work = Path(tempfile.mkdtemp(prefix="oip-throughput-"))  # the server's log
    per: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    t0 = time.time()
    with classmeans_server(REPO / "model_store", MODEL, work / "serve.log") as srv:
        for t in targets:  # warm every path once (not measured)
            run_load(srv.url, t, images, concurrency=concurrency, requests=warmup, server_pid=srv.pid)
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                per[t.name].append(run_load(srv.url, t, images, concurrency=concurrency, requests=requests,
                                            offset=(r * requests) % len(images), server_pid=srv.pid))
    merged = {name: merge_rounds(reports) for name, reports in per.items()}
    summary = {name: {"ok_rps": m["ok_rps"], "rounds_ok_rps": [x["ok_rps"] for x in m["rounds"]],
                      "server_cpu_ms_per_request": _median(_cpu_ms(r) for r in per[name]),
                      "p50_s": m["latency_seconds"]["p50"], "p99_s": m["latency_seconds"]["p99"],
                      "ok": m["counts"]["ok_2xx"], "sent": m["counts"]["sent"],
                      "accuracy": m["early_exit"]["accuracy"],
                      "mean_flops_fraction": m["early_exit"]["mean_flops_fraction"],
                      "mean_request_body_bytes": body_bytes.get(name)}
               for name, m in merged.items()}
    pairs = {"binary_png_over_json_base64_png": ("oip_binary_png", "oip_json_base64_png"),
             "binary_fp32_over_json_list_fp32": ("oip_binary_fp32", "oip_json_list_fp32"),
             "binary_png_over_classify_raw_png": ("oip_binary_png", "classify_raw_png")}
    result = {
        "what": "OIP v2 binary tensor extension vs JSON, one server, 32 concurrent clients (bench/oip_throughput.py)",
        "model": MODEL, "images": images.source, "concurrency": concurrency, "rounds": rounds,
        "requests_per_round": requests, "warmup_requests": warmup,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "shared 2-core machine with a niced background training job and other users; "
                            "ratios are from interleaved rounds of one run"},
        "summary": summary,
        "throughput_ratio_of_medians": {k: summary[a]["ok_rps"] / summary[b]["ok_rps"] for k, (a, b) in pairs.items()},
        "throughput_ratio_median_of_rounds": {k: _median(x["ok_rps"] / y["ok_rps"] for x, y in zip(
            per[a], per[b], strict=True)) for k, (a, b) in pairs.items()},
        "server_cpu_per_request_ratio": {k: summary[b]["server_cpu_ms_per_request"]
                                         / summary[a]["server_cpu_ms_per_request"] for k, (a, b) in pairs.items()},
        "wall_seconds": time.time() - t0,
        "details": merged,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "oip_throughput.json")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=96, help="measured requests per variant per round")
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    a = ap.parse_args(argv)
    res = run(a.out, a.rounds, a.requests, a.warmup, a.concurrency, a.images)
    print(json.dumps({k: res[k] for k in ("summary", "throughput_ratio_of_medians",
                                          "throughput_ratio_median_of_rounds", "server_cpu_per_request_ratio")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
