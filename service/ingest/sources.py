"""Open a labelled dataset named on the command line: ``.npz``, ImageFolder directory, ``.zip`` or ``.tar.gz``."""

from __future__ import annotations

from pathlib import Path

from service.ingest.labelled import DatasetError, LabelledImages
from service.ingest.npz import load_npz


def load_dataset(src: Path | str, image_size: tuple[int, int] | None = None,
                 limit: int | None = None) -> LabelledImages:
    path = Path(src)
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
