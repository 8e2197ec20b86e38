"""The full network of a model folder exported to ONNX, for the LitServe + ONNX Runtime baseline.

    python -m bench.onnx_full --model-dir model_store/cifar10-resnet56 --out /tmp/full.onnx

What a performance engineer would deploy without our service: the whole network (no exits), exported with
the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``), opset 17, a dynamic batch dimension,
input ``input`` (normalised float32 NCHW), output ``logits``. :func:`check` runs it in ONNX Runtime against
the eager network and returns the top-1 agreement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

OPSET = 17


def full_network(model_dir: Path):  # type: ignore[no-untyped-def]
    """``(spec, network, normaliser)`` of the model's full network: a cascade's is its last member alone."""
    from service.backbones.preprocess import Normalizer
    from service.store.model_dir import load_model

    spec, net = load_model(model_dir)
    members = getattr(net, "members", None)
    if members:
        return spec, members[-1].net.eval(), members[-1].normalizer
    return spec, net.eval(), Normalizer(spec.mean, spec.std)


def export(model_dir: Path, out: Path) -> dict[str, object]:
    """Write ``out`` (the full network, dynamic batch); returns what was exported."""
    spec, net, _ = full_network(model_dir)
    size = tuple(spec.input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(net.module, (torch.zeros(2, 3, *size),), str(out), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return {"path": str(out), "opset": OPSET, "exporter": "torch.onnx.export(dynamo=False)",
            "dynamic_batch": True, "bytes": out.stat().st_size, "input_size": list(size)}


def check(model_dir: Path, onnx_path: Path, pixels: np.ndarray, threads: int = 1) -> dict[str, float]:
    """Top-1 agreement of ONNX Runtime with the eager network on ``pixels (n, H, W, 3) uint8``, and the
    largest absolute logit difference."""
    import onnxruntime as ort

    _, net, norm = full_network(model_dir)
    x = norm(pixels)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = torch.cat([net.module(b) for b in x.split(64)]).numpy()
    got = np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(64)])
    return {"images": len(x), "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(ref - got).max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    print(export(args.model_dir, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
