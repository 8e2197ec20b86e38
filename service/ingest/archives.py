"""Labelled images from an untrusted ImageFolder archive (zip, tar, tar.gz) or directory.

Layout: ``class_name/file.ext``, optionally under one common top-level folder, which is stripped. Class names
are sorted alphabetically (as torchvision's ``ImageFolder`` does) unless the caller passes the model's.

Security rules (docs/design.md, "Untrusted input"):

- Members are iterated and read into memory; nothing is extracted and nothing named by the archive touches
  the disk. The container type comes from magic bytes, not from the file name.
- Names are checked before anything else: no absolute path, no ``..``, no backslash, no drive letter, no NUL
  or control character, no Windows device name, valid UTF-8. Names are NFC-normalised; two names equal after
  case folding are refused (``duplicate_member``).
- Only regular files and directories are accepted: symlinks, hardlinks, devices, fifos, sockets and sparse
  files are refused (``unsafe_archive_member``). A directory on disk may hold symlinks only to places inside
  it.
- Counts and sizes are capped by :class:`ArchiveLimits`: members (counted while iterating, directories
  included), bytes actually decompressed per member and in total (declared sizes are not trusted), the
  compression ratio, the pixels of each image and the bytes of all decoded images. Overlapping zip members are
  refused. Breaking a cap is ``archive_bomb`` or ``too_many_files``.
- Junk is skipped: ``__MACOSX/``, hidden files and folders (``.DS_Store``, ``._x``), ``Thumbs.db``,
  ``desktop.ini``.
- Every other file must be an image accepted by :func:`service.ingest.images.decode_image` (strict).

Every failure is a :class:`~service.ingest.labelled.DatasetError` whose ``code`` is one of
``unsupported_archive``, ``unsafe_archive_member``, ``archive_bomb``, ``too_many_files``,
``duplicate_member``, ``invalid_dataset_layout``, ``class_set_mismatch``, ``invalid_dataset_image`` or
``invalid_dataset`` (a directory that cannot be read), and whose message names the member or class.
"""

from __future__ import annotations

import lzma
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from service.ingest.images import DEFAULT_MAX_PIXELS
from service.ingest.labelled import DatasetError, LabelledImages
from service.ingest.layout import build
from service.ingest.members import Budget, MiB, dataset_root, dir_entries, tar_entries, zip_entries
from service.ingest.preprocessing import Preprocessing, as_preprocessing

GiB: Final[int] = 1 << 30


# What the standard library raises for a corrupt container (zipfile, tarfile, gzip, zlib, lzma, bz2).
_CORRUPT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    struct.error,
    NotImplementedError,
    ValueError,
    OverflowError,
)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied while reading an archive or a dataset directory.

    Attributes:
        max_members: entries seen while iterating, directories and junk included.
        max_member_bytes: bytes actually decompressed for one member.
        max_total_bytes: bytes actually decompressed for all members together.
        max_ratio: largest decompressed/compressed ratio (per zip member; whole stream for tar.gz).
        max_pixels: largest ``width * height`` of one image, checked before decoding.
        min_per_class: fewest images a class may have.
        max_decoded_bytes: size of all decoded ``uint8 (H, W, 3)`` arrays together.
    """

    max_members: int = 60_000
    max_member_bytes: int = 20 * MiB
    max_total_bytes: int = 512 * MiB
    max_ratio: float = 200.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_per_class: int = 1
    max_decoded_bytes: int = 1 * GiB

    def __post_init__(self) -> None:
        for name in ("max_members", "max_member_bytes", "max_total_bytes", "max_ratio", "max_pixels",
                     "min_per_class", "max_decoded_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ArchiveLimits.{name} must be positive")

    @classmethod
    def for_cli(cls) -> ArchiveLimits:
        """Generous caps for a dataset the operator names on the command line."""
        return cls(max_members=200_000, max_total_bytes=2 * GiB, max_decoded_bytes=16 * GiB)

    @classmethod
    def for_upload(cls) -> ArchiveLimits:
        """Caps for an archive uploaded over HTTP (the defaults)."""
        return cls()


def read_image_folder_archive(
    fileobj: BinaryIO,
    filename: str,
    image_size: tuple[int, int] | Preprocessing | None = None,
    limits: ArchiveLimits = ArchiveLimits.for_upload(),
    allowed_classes: list[str] | None = None,
) -> LabelledImages:
    """Read an ImageFolder zip, tar or tar.gz archive into memory, without extracting it.

    Args:
        fileobj: the archive, opened for binary reading and seekable (a file, ``BytesIO`` or spooled upload).
        filename: the archive's name, used in messages only; the type comes from the magic bytes.
        image_size: ``(height, width)`` every image is resized to, or the model's :class:`Preprocessing`;
            ``None`` requires all images to share
            one size.
        limits: caps on members, bytes, ratio and pixels.
        allowed_classes: the model's classes. When given, the archive's classes must be exactly these (else
            ``class_set_mismatch`` naming the differences), and labels index into this list in this order.

    Returns:
        :class:`LabelledImages` with ``uint8 (N, H, W, 3)`` images, ``int64 (N,)`` labels and the class list,
        samples ordered by class then path.

    Raises:
        DatasetError: with one of the codes listed in the module docstring.
    """
    _check_size_argument(image_size)
    kind = _sniff_archive(fileobj, filename)
    budget = Budget(limits)
    try:
        if kind == "zip":
            entries = zip_entries(fileobj, limits, budget)
        else:
            entries = tar_entries(fileobj, kind == "tar.gz", limits, budget)
        return build(entries, image_size, limits, allowed_classes, budget)
    except DatasetError:
        raise
    except _CORRUPT_ERRORS as exc:
        reason = str(exc)[:160] or type(exc).__name__
        raise DatasetError(f"{filename!r} is not a readable {kind} archive (corrupt or truncated: {reason})",
                           code="unsupported_archive") from exc


def read_image_folder_dir(
    path: Path,
    image_size: tuple[int, int] | Preprocessing | None = None,
    limits: ArchiveLimits = ArchiveLimits.for_cli(),
    allowed_classes: list[str] | None = None,
) -> LabelledImages:
    """Read an ImageFolder directory on disk with the same rules and caps as an archive.

    Symlinks are followed only when they resolve inside ``path``; fifos, devices and sockets are refused
    without being opened. Arguments, result and errors are as for :func:`read_image_folder_archive`.
    """
    _check_size_argument(image_size)
    root = dataset_root(path)
    budget = Budget(limits)
    return build(dir_entries(root, root, (), limits, budget), image_size, limits, allowed_classes, budget)


def _check_size_argument(image_size: tuple[int, int] | Preprocessing | None) -> None:
    """A bad ``image_size`` is the caller's bug: say so before reading anything."""
    if image_size is not None:
        try:
            as_preprocessing(image_size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"image_size must be a positive (height, width), got {image_size!r}") from exc


def _sniff_archive(fileobj: BinaryIO, filename: str) -> str:
    """Return ``"zip"``, ``"tar"`` or ``"tar.gz"`` from the magic bytes; refuse anything else."""
    try:
        if not fileobj.seekable():
            raise DatasetError(f"{filename!r}: the archive stream must be seekable",
                               code="unsupported_archive")
        start = fileobj.tell()
        head = fileobj.read(512)
        fileobj.seek(start)
    except OSError as exc:
        raise DatasetError(f"{filename!r} cannot be read", code="unsupported_archive") from exc
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    if not head:
        raise DatasetError(f"{filename!r} is empty", code="unsupported_archive")
    known = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"7z\xbc\xaf\x27\x1c": "7z", b"Rar!": "rar"}
    for magic, what in known.items():
        if head.startswith(magic):
            raise DatasetError(f"{filename!r} is a {what} file; use zip, tar or tar.gz",
                               code="unsupported_archive")
    raise DatasetError(f"{filename!r} is not a zip, tar or tar.gz archive", code="unsupported_archive")


