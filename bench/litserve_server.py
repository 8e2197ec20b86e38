"""LitServe (from PyPI) serving the same full network with dynamic batching: the baseline users pick today.

    python -m bench.litserve_server --model-dir model_store/cifar10-resnet56 --port 8011

The request follows LitServe's documented image pattern: ``POST /predict`` with JSON
``{"image": "<base64 PNG>"}``; the answer is ``{"class_index": k, "label": name, "confidence": p}``.
Decoding is plain Pillow (``Image.open(...).convert("RGB")``), the normalisation is the model's own
(``model.json``), the network is the same weights through ``torch.inference_mode``. Binds 127.0.0.1 only
(LitServe's own default is 0.0.0.0).
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from PIL import Image


class ClassifierAPI(ls.LitAPI):
    """Decode -> normalise -> batched full forward -> top-1 answer."""

    def __init__(self, model_dir: Path, torch_threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = Path(model_dir)
        self.torch_threads = torch_threads

    def setup(self, device: str) -> None:
        from service.backbones.preprocess import Normalizer
        from service.store.model_dir import load_model

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.spec, self.net = load_model(self.model_dir)
        self.net.eval()
        self.normalizer = Normalizer(self.spec.mean, self.spec.std)
        self.size = tuple(self.spec.input_size)
        with torch.inference_mode():  # warm-up
            self.net.module(torch.zeros(1, 3, *self.size))

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the JSON
        im = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
        if im.size != (self.size[1], self.size[0]):
            im = im.resize((self.size[1], self.size[0]))
        return np.asarray(im, dtype=np.uint8)

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return self.normalizer(np.stack(inputs))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> list[tuple[int, float]]:
        probs = torch.softmax(self.net.module(x).float(), dim=1)
        conf, pred = probs.max(dim=1)
        return list(zip(pred.tolist(), conf.tolist(), strict=True))

    def unbatch(self, output: list[tuple[int, float]]) -> list[tuple[int, float]]:
        return output

    def encode_response(self, output: tuple[int, float]) -> dict[str, Any]:
        k, p = output
        return {"class_index": int(k), "label": self.spec.classes[int(k)], "confidence": float(p)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-timeout", type=float, default=0.005, help="seconds LitServe waits to fill a batch")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args(argv)
    api = ClassifierAPI(Path(args.model_dir), args.torch_threads, max_batch_size=args.max_batch_size,
                        batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
