"""``.npz`` datasets with ``images`` (uint8 N,H,W,3), ``labels`` (int N) and ``classes`` (str K).

This is the layout of ``../shared/datasets/cifar10``. Loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.ingest.labelled import DatasetError, LabelledImages


def load_npz(path: Path, limit: int | None = None) -> LabelledImages:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"images", "labels", "classes"} - set(data.files)
            if missing:
                raise DatasetError(f"{path}: missing arrays {sorted(missing)}")
            images = data["images"]
            labels = data["labels"].astype(np.int64)
            classes = [str(c) for c in data["classes"]]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return LabelledImages(np.ascontiguousarray(images), labels, classes)
