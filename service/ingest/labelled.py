"""An in-memory labelled image set: ``uint8 (N, H, W, 3)`` RGB images, ``int64 (N,)`` labels, class names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from service.errors import ServiceError


class DatasetError(ServiceError, ValueError):
    """A dataset cannot be used: the message says why (file, member, class)."""

    code = "invalid_dataset"
    status = 422
    STATUS_BY_CODE: ClassVar[dict[str, int]] = {"unsupported_archive": 415, "archive_bomb": 413, "too_many_files": 413}


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DatasetError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError("labels must be one per image")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DatasetError("labels out of range of the class list")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[idx], self.labels[idx], list(self.classes))

    def remap_to(self, model_classes: list[str]) -> LabelledImages:
        """Reorder labels to the model's class order; every class of the data must be a model class."""
        if list(self.classes) == list(model_classes):
            return self
        unknown = sorted(set(self.classes) - set(model_classes))
        if unknown:
            raise DatasetError(f"classes not in the model: {', '.join(unknown)}", code="class_set_mismatch")
        mapping = np.array([model_classes.index(c) for c in self.classes], dtype=np.int64)
        return LabelledImages(self.images, mapping[self.labels], list(model_classes))

    def split_holdout(self, holdout: int, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
        """Stratified split: ``holdout`` samples (spread evenly over classes) go to the second part."""
        n = len(self)
        if holdout <= 0:
            return self, self.subset(np.zeros(0, dtype=np.int64))
        if holdout >= n:
            raise DatasetError(f"holdout {holdout} must be smaller than the dataset ({n})")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        # Stratify: take from each class in proportion to its size.
        hold = []
        for k in range(len(self.classes)):
            idx_k = perm[self.labels[perm] == k]
            take = round(holdout * len(idx_k) / n)
            hold.append(idx_k[:take])
        hold_idx = np.sort(np.concatenate(hold)) if hold else np.zeros(0, dtype=np.int64)
        mask = np.ones(n, dtype=bool)
        mask[hold_idx] = False
        return self.subset(np.nonzero(mask)[0]), self.subset(hold_idx)
