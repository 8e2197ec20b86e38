"""The benchmark's payloads: real CIFAR-10 test images, PNG-encoded in memory, with their labels.

The data set is read from ``../shared/datasets/cifar10/test.npz`` (never copied into the repository).
Without it (a user's machine), synthetic labelled images stand in and the accuracy figures say so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "datasets" / "cifar10" / "test.npz"


@dataclass(frozen=True)
class ImageSet:
    """``pixels (n, H, W, 3) uint8``, ``labels (n,)``, the PNG of each image, and where they came from."""

    pixels: np.ndarray
    labels: np.ndarray
    pngs: list[bytes]
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.pngs)


def png_bytes(pixels: np.ndarray) -> bytes:
    """One ``(H, W, 3) uint8`` image as PNG bytes (Pillow, default compression)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def load_images(n: int, path: Path = CIFAR_TEST, offset: int = 0) -> ImageSet:
    """The first ``n`` test images after ``offset`` (CIFAR-10 when present, else synthetic)."""
    if path.is_file():
        with np.load(path) as d:
            pixels = np.ascontiguousarray(d["images"][offset:offset + n])
            labels = np.asarray(d["labels"][offset:offset + n], dtype=np.int64)
            classes = [str(c) for c in d["classes"]] if "classes" in d else []
        source = f"CIFAR-10 test set ({path.name}, images {offset}..{offset + len(labels) - 1})"
    else:
        from tests.factories import synthetic_images

        data = synthetic_images(n, seed=11)
        pixels, labels, classes = data.images, data.labels.astype(np.int64), list(data.classes)
        source = "synthetic images (CIFAR-10 not found; accuracy figures are not meaningful)"
    return ImageSet(pixels, labels, [png_bytes(p) for p in pixels], classes, source)
