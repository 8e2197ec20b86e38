"""LitServe (from PyPI) serving the same full network with dynamic batching: the baseline users pick today.

    python -m bench.litserve_server --model-dir model_store/cifar10-resnet56 --port 8011
        [--workers-per-device 2] [--torch-threads 1] [--onnx full.onnx] [--raw-body]

The request follows LitServe's documented image pattern: ``POST /predict`` with JSON
``{"image": "<base64 PNG>"}``, or with ``--raw-body`` the PNG itself as the body (``Content-Type:
image/png``, the same bytes our ``/classify`` gets); the answer is ``{"class_index": k, "label": name,
"confidence": p}``. Decoding is plain Pillow (``Image.open(...).convert("RGB")``), the normalisation is the
model's own (``model.json``), the network is the same weights through ``torch.inference_mode``, or with
``--onnx`` the same network exported to ONNX (``bench/onnx_full.py``) run by ONNX Runtime with
``--torch-threads`` intra-op threads. Binds 127.0.0.1 only (LitServe's own default is 0.0.0.0).
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import numpy as np
import torch
from fastapi import Body
from PIL import Image

# A raw body: FastAPI hands a non-JSON body over as bytes, and LitServe passes any request type but
# starlette's Request on to decode_request unchanged (bytes cross its worker queue as they are).
RawPNG = Annotated[bytes, Body(media_type="image/png")]


class ClassifierAPI(ls.LitAPI):
    """Decode -> normalise -> batched full forward -> top-1 answer."""

    def __init__(self, model_dir: Path, torch_threads: int, onnx: Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = Path(model_dir)
        self.torch_threads = torch_threads
        self.onnx = onnx
        self.session: Any = None

    def setup(self, device: str) -> None:
        from bench.onnx_full import full_network

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        # a cascade of models: LitServe serves its full network, the last member alone
        self.spec, self.net, self.normalizer = full_network(self.model_dir)
        self.size = tuple(self.spec.input_size)
        if self.onnx is not None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.torch_threads
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(self.onnx), opts, providers=["CPUExecutionProvider"])
            self.session.run(None, {"input": np.zeros((1, 3, *self.size), dtype=np.float32)})  # warm-up
            self.net = None  # only ONNX Runtime's copy of the weights stays resident
            return
        with torch.inference_mode():  # warm-up
            self.net.module(torch.zeros(1, 3, *self.size))

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the JSON
        return self._decode(base64.b64decode(request["image"]))

    def _decode(self, data: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        if im.size != (self.size[1], self.size[0]):
            im = im.resize((self.size[1], self.size[0]))
        return np.asarray(im, dtype=np.uint8)

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return self.normalizer(np.stack(inputs))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> list[tuple[int, float]]:
        if self.session is not None:
            logits = torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])
        else:
            logits = self.net.module(x)
        probs = torch.softmax(logits.float(), dim=1)
        conf, pred = probs.max(dim=1)
        return list(zip(pred.tolist(), conf.tolist(), strict=True))

    def unbatch(self, output: list[tuple[int, float]]) -> list[tuple[int, float]]:
        return output

    def encode_response(self, output: tuple[int, float]) -> dict[str, Any]:
        k, p = output
        return {"class_index": int(k), "label": self.spec.classes[int(k)], "confidence": float(p)}


class RawClassifierAPI(ClassifierAPI):
    """The same API, the request body being the encoded image itself."""

    def decode_request(self, request: RawPNG) -> np.ndarray:  # type: ignore[override]
        return self._decode(request)


# LitServe reads the annotation with inspect.signature, which leaves this module's postponed (string)
# annotations unresolved: give it the object.
RawClassifierAPI.decode_request.__annotations__["request"] = RawPNG


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-timeout", type=float, default=0.005, help="seconds LitServe waits to fill a batch")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads per worker, or ONNX Runtime's with --onnx (0: the default)")
    ap.add_argument("--workers-per-device", type=int, default=1, help="LitServe inference worker processes")
    ap.add_argument("--onnx", type=Path, help="serve this ONNX export of the network through ONNX Runtime")
    ap.add_argument("--raw-body", action="store_true", help="accept the image itself as the request body")
    args = ap.parse_args(argv)
    cls = RawClassifierAPI if args.raw_body else ClassifierAPI
    api = cls(Path(args.model_dir), args.torch_threads, args.onnx, max_batch_size=args.max_batch_size,
              batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers_per_device, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
