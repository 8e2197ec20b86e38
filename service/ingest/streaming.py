"""An ImageFolder directory read lazily: images are decoded batch by batch, so memory stays bounded whatever
the number of images (calibration and evaluation slice ``images[lo:hi]`` one batch at a time).

The directory is listed with the same safety rules as the eager reader (:mod:`service.ingest.archives`:
symlinks only inside the root, no devices, junk skipped, ``class_name/file`` layout, at most ``max_members``
entries), and the samples come in the same order (class, then case-folded path), so a streamed dataset is the
eager one, image for image. A file that turns out not to be a usable image fails the run when its batch is
decoded (the eager reader finds it up front), naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from service.ingest.archives import ArchiveLimits
from service.ingest.images import ImageError, decode_image
from service.ingest.labelled import DatasetError, LabelledImages
from service.ingest.members import Budget, dataset_root, dir_entries, fold, is_junk
from service.ingest.preprocessing import Preprocessing, as_preprocessing


class LazyImages:
    """Duck-types the ``uint8 (N, H, W, 3)`` array of :class:`LabelledImages`: a slice decodes those files
    (an ``np.ndarray``); an index array gives another :class:`LazyImages` (a subset, nothing decoded)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, readers: Sequence[Callable[[], bytes]], names: Sequence[str], prep: Preprocessing,
                 max_pixels: int) -> None:
        self._readers, self._names = list(readers), list(names)
        self.prep, self.max_pixels = prep, max_pixels

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._readers), *self.prep.size, 3)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self._readers)

    def __getitem__(self, key: slice | np.ndarray | list[int]) -> np.ndarray | LazyImages:
        if isinstance(key, slice):
            idx = range(*key.indices(len(self._readers)))
            out = np.empty((len(idx), *self.prep.size, 3), dtype=np.uint8)
            for row, i in enumerate(idx):
                out[row] = self._decode(i)
            return out
        sel = np.asarray(key)
        if sel.dtype == bool:
            sel = np.nonzero(sel)[0]
        return LazyImages([self._readers[int(i)] for i in sel], [self._names[int(i)] for i in sel], self.prep,
                          self.max_pixels)

    def _decode(self, i: int) -> np.ndarray:
        try:
            return decode_image(self._readers[i](), self.prep, self.max_pixels)
        except ImageError as exc:
            raise DatasetError(f"{self._names[i]!r} is not a usable image ({exc.code}): {exc}",
                               code="invalid_dataset_image") from exc


def stream_image_folder_dir(path: Path, image_size: tuple[int, int] | Preprocessing,
                            limits: ArchiveLimits | None = None) -> LabelledImages:
    """List ``path`` (ImageFolder: ``class_name/file``) and return a :class:`LabelledImages` whose images are
    decoded on demand with ``image_size`` (the model's resize rule)."""
    limits = limits or ArchiveLimits.for_cli()
    prep = as_preprocessing(image_size)
    root = dataset_root(path)
    files = [e for e in dir_entries(root, root, (), limits, Budget(limits))
             if not e.is_dir and e.parts and not is_junk(e.parts)]
    tops = {e.parts[0] for e in files}
    strip = 1 if len(tops) == 1 and any(len(e.parts) >= 3 for e in files) else 0
    by_class: dict[str, list] = {}
    for e in files:
        if len(e.parts) - strip != 2:
            raise DatasetError(f"file {e.name!r} is not in a class folder; expected class_name/file",
                               code="invalid_dataset_layout")
        by_class.setdefault(e.parts[strip], []).append(e)
    if len(by_class) < 2:
        raise DatasetError(f"need at least 2 class folders with images, found {len(by_class)}",
                           code="invalid_dataset_layout")
    classes = sorted(by_class)
    samples = sorted(((k, fold("/".join(e.parts)), e) for k, c in enumerate(classes) for e in by_class[c]),
                     key=lambda s: (s[0], s[1]))
    images = LazyImages([e.read for _, _, e in samples], [e.name for _, _, e in samples], prep, limits.max_pixels)
    labels = np.array([k for k, _, _ in samples], dtype=np.int64)
    return LabelledImages(images, labels, classes)  # type: ignore[arg-type]
