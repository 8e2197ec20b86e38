"""Open a labelled dataset named on the command line: ``.npz``, ImageFolder directory, ``.zip`` or ``.tar.gz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.ingest.labelled import DatasetError, LabelledImages
from service.ingest.npz import load_npz


def load_dataset(src: Path | str, image_size=None, limit: int | None = None, stream: bool = False
                 ) -> LabelledImages:
    """``image_size``: ``(H, W)`` or the model's ``Preprocessing``. ``stream``: an ImageFolder directory is listed
    now and decoded batch by batch when used (bounded memory; see :mod:`service.ingest.streaming`)."""
    path = Path(src)
    if stream:
        if not path.is_dir():
            raise DatasetError(f"{path}: --stream reads an ImageFolder directory")
        if image_size is None:
            raise DatasetError("streaming needs the model's input size")
        from service.ingest.streaming import stream_image_folder_dir

        data = stream_image_folder_dir(path, image_size)
        return data.subset(np.arange(min(limit, len(data)))) if limit is not None else data
    name = path.name.lower()
    if name.endswith(".npz"):
        return load_npz(path, limit=limit)
    from service.ingest.archives import ArchiveLimits, read_image_folder_archive, read_image_folder_dir

    if path.is_dir():
        return read_image_folder_dir(path, image_size=image_size, limits=ArchiveLimits.for_cli())
    if name.endswith((".zip", ".tar.gz", ".tgz", ".tar")):
        with open(path, "rb") as fh:
            return read_image_folder_archive(fh, name, image_size=image_size, limits=ArchiveLimits.for_cli())
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    raise DatasetError(f"{path}: expected .npz, .zip, .tar.gz or an ImageFolder directory")
