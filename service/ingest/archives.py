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

import gzip
import itertools
import lzma
import os
import re
import stat
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np

from service.ingest.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from service.ingest.labelled import DatasetError, LabelledImages

MiB: Final[int] = 1 << 20
GiB: Final[int] = 1 << 30

_READ_CHUNK: Final[int] = 1 * MiB
# The ratio cap is only applied once this many bytes came out: tiny members compress arbitrarily well.
_RATIO_FLOOR: Final[int] = 1 * MiB
# Tar headers and padding allowed on top of member data in the decompressed stream, per member.
_TAR_OVERHEAD_PER_MEMBER: Final[int] = 2048
_LISTED: Final[int] = 10  # how many offending names an error message lists

_ZIP_METHODS: Final[frozenset[int]] = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_WINDOWS_DEVICES: Final[frozenset[str]] = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
)
_JUNK_FILES: Final[frozenset[str]] = frozenset({"thumbs.db", "desktop.ini"})
_DRIVE: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z]:")

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
    image_size: tuple[int, int] | None = None,
    limits: ArchiveLimits = ArchiveLimits.for_upload(),
    allowed_classes: list[str] | None = None,
) -> LabelledImages:
    """Read an ImageFolder zip, tar or tar.gz archive into memory, without extracting it.

    Args:
        fileobj: the archive, opened for binary reading and seekable (a file, ``BytesIO`` or spooled upload).
        filename: the archive's name, used in messages only; the type comes from the magic bytes.
        image_size: ``(height, width)`` every image is resized to; ``None`` requires all images to share
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
    budget = _Budget(limits)
    try:
        if kind == "zip":
            entries = _zip_entries(fileobj, limits, budget)
        else:
            entries = _tar_entries(fileobj, kind == "tar.gz", limits, budget)
        return _build(entries, image_size, limits, allowed_classes, budget)
    except DatasetError:
        raise
    except _CORRUPT_ERRORS as exc:
        reason = str(exc)[:160] or type(exc).__name__
        raise DatasetError(f"{filename!r} is not a readable {kind} archive (corrupt or truncated: {reason})",
                           code="unsupported_archive") from exc


def read_image_folder_dir(
    path: Path,
    image_size: tuple[int, int] | None = None,
    limits: ArchiveLimits = ArchiveLimits.for_cli(),
    allowed_classes: list[str] | None = None,
) -> LabelledImages:
    """Read an ImageFolder directory on disk with the same rules and caps as an archive.

    Symlinks are followed only when they resolve inside ``path``; fifos, devices and sockets are refused
    without being opened. Arguments, result and errors are as for :func:`read_image_folder_archive`.
    """
    _check_size_argument(image_size)
    try:
        root = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise DatasetError(f"{str(path)!r} cannot be opened (missing, unreadable or a symlink loop)") from exc
    if not root.is_dir():
        raise DatasetError(f"{str(path)!r} is not a directory")
    budget = _Budget(limits)
    return _build(_dir_entries(root, root, (), limits, budget), image_size, limits, allowed_classes, budget)


# ----------------------------------------------------------------------------------------------------
# Entries: one per archive member or directory item, with checked path components.


@dataclass
class _Entry:
    """One member: ``name`` as stored (for messages), safe NFC ``parts``, and how to read its bytes.

    For tar streams ``read`` is only valid until the iterator advances; :func:`_build` calls it at once.
    """

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    read: Callable[[], bytes] | None = None


@dataclass
class _Budget:
    """Running totals checked against :class:`ArchiveLimits`."""

    limits: ArchiveLimits
    members: int = 0
    total_bytes: int = 0
    decoded_bytes: int = 0

    def count_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise DatasetError(f"more than {self.limits.max_members} members (stopped at {name!r})",
                               code="too_many_files")

    def add_bytes(self, n: int, name: str) -> None:
        self.total_bytes += n
        if self.total_bytes > self.limits.max_total_bytes:
            raise DatasetError(f"members decompress to more than {self.limits.max_total_bytes} bytes in "
                               f"total (stopped at {name!r})", code="archive_bomb")

    def add_decoded(self, n: int, name: str) -> None:
        self.decoded_bytes += n
        if self.decoded_bytes > self.limits.max_decoded_bytes:
            raise DatasetError(f"decoded images take more than {self.limits.max_decoded_bytes} bytes "
                               f"(stopped at {name!r}); pass a smaller image size", code="archive_bomb")


def _check_size_argument(image_size: tuple[int, int] | None) -> None:
    """A bad ``image_size`` is the caller's bug: say so before reading anything."""
    if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
        raise ValueError(f"image_size must be a positive (height, width), got {image_size!r}")


def _unsafe(name: str, why: str) -> DatasetError:
    return DatasetError(f"unsafe archive member {name!r}: {why}", code="unsafe_archive_member")


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _fold(text: str) -> str:
    """Caseless key: NFC, case folded, NFC again."""
    return _nfc(_nfc(text).casefold())


def _member_parts(name: str) -> tuple[str, ...]:
    """Split a member name into NFC path components, refusing every unsafe form.

    ``.`` and empty components are dropped (``./cat/x.png`` is ``cat/x.png``); an empty result is the root.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _unsafe(name, "control character or NUL in the name")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise _unsafe(name, "the name is not valid UTF-8")
    if "\\" in name:
        raise _unsafe(name, "backslash in the name")
    if name.startswith("/"):
        raise _unsafe(name, "absolute path")
    if _DRIVE.match(name):
        raise _unsafe(name, "drive letter")
    parts = tuple(_nfc(p) for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _unsafe(name, "'..' in the path")
    if len(name) > 4096 or any(len(p.encode("utf-8")) > 255 for p in parts):
        raise _unsafe(name, "name too long")
    for part in parts:
        if part.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
            raise _unsafe(name, f"reserved device name {part!r}")
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    """OS metadata that is skipped silently: ``__MACOSX/``, hidden entries, ``Thumbs.db``, ``desktop.ini``."""
    return (any(p == "__MACOSX" or p.startswith(".") for p in parts)
            or parts[-1].casefold() in _JUNK_FILES)


def _read_bounded(fh: BinaryIO, name: str, cap: int) -> bytes:
    """Read ``fh`` to its end, raising ``archive_bomb`` as soon as more than ``cap`` bytes come out."""
    chunks: list[bytes] = []
    n = 0
    while True:
        chunk = fh.read(min(_READ_CHUNK, cap + 1 - n))
        if not chunk:
            return b"".join(chunks)
        n += len(chunk)
        if n > cap:
            raise DatasetError(f"archive member {name!r} decompresses to more than {cap} bytes",
                               code="archive_bomb")
        chunks.append(chunk)


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


# ----------------------------------------------------------------------------------------------------
# Zip


def _zip_entries(fileobj: BinaryIO, limits: ArchiveLimits, budget: _Budget) -> Iterator[_Entry]:
    """Entries of a zip file, from its central directory; member bytes are read lazily and capped."""
    with zipfile.ZipFile(fileobj) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise DatasetError(f"the archive has {len(infos)} members, more than {limits.max_members}",
                               code="too_many_files")
        _check_zip_overlap(infos)
        for info in infos:
            budget.count_member(info.filename)
            yield _zip_entry(zf, info, limits)


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> _Entry:
    name = info.filename
    if info.orig_filename != name:
        raise _unsafe(info.orig_filename, "NUL in the name")
    parts = _member_parts(name)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise _unsafe(name, "symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _unsafe(name, "device, fifo or socket")
    if info.is_dir() or kind == stat.S_IFDIR:
        return _Entry(name, parts, is_dir=True)
    if info.flag_bits & 0x1:
        raise DatasetError(f"archive member {name!r} is encrypted", code="unsupported_archive")
    if info.compress_type not in _ZIP_METHODS:
        raise DatasetError(f"archive member {name!r} uses unsupported compression method "
                           f"{info.compress_type}", code="unsupported_archive")

    def read() -> bytes:
        with zf.open(info) as fh:
            data = _read_bounded(fh, name, limits.max_member_bytes)  # type: ignore[arg-type]
        if len(data) > _RATIO_FLOOR and len(data) > limits.max_ratio * max(info.compress_size, 1):
            raise DatasetError(f"archive member {name!r} has a compression ratio over {limits.max_ratio:g}",
                               code="archive_bomb")
        return data

    return _Entry(name, parts, is_dir=False, read=read)


def _check_zip_overlap(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse members whose data overlap (the non-recursive zip bomb shares one stream among many entries)."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for prev, cur in itertools.pairwise(ordered):
        if (cur.header_offset <= prev.header_offset
                or prev.header_offset + prev.compress_size > cur.header_offset):
            raise DatasetError(f"archive members {prev.filename!r} and {cur.filename!r} overlap",
                               code="archive_bomb")


# ----------------------------------------------------------------------------------------------------
# Tar and tar.gz


class _CappedStream:
    """A read-only byte stream that stops with ``archive_bomb`` past ``cap`` bytes or past ``max_ratio``.

    ``raw`` is the compressed file underneath (for the ratio); ``None`` when the stream is not compressed.
    """

    def __init__(self, inner: BinaryIO, raw: BinaryIO | None, cap: int, max_ratio: float) -> None:
        self._inner = inner
        self._raw = raw
        self._raw_start = raw.tell() if raw is not None else 0
        self._cap = cap
        self._max_ratio = max_ratio
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._cap + 1 - self.count
        data = self._inner.read(min(n, self._cap + 1 - self.count))
        self.count += len(data)
        if self.count > self._cap:
            raise DatasetError(f"the archive decompresses to more than {self._cap} bytes",
                               code="archive_bomb")
        if self._raw is not None and self.count > _RATIO_FLOOR:
            consumed = max(self._raw.tell() - self._raw_start, 1)
            if self.count > self._max_ratio * consumed:
                raise DatasetError(f"the archive has a compression ratio over {self._max_ratio:g}",
                                   code="archive_bomb")
        return data


def _tar_entries(fileobj: BinaryIO, compressed: bool, limits: ArchiveLimits, budget: _Budget
                 ) -> Iterator[_Entry]:
    """Entries of a tar stream, read in one forward pass (``r|``); gzip is decompressed here, capped."""
    gz = gzip.GzipFile(fileobj=fileobj, mode="rb") if compressed else None
    cap = limits.max_total_bytes + _TAR_OVERHEAD_PER_MEMBER * (limits.max_members + 2)
    stream = _CappedStream(gz or fileobj, fileobj if gz else None, cap, limits.max_ratio)  # type: ignore[arg-type]
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:  # type: ignore[call-overload]
            while (member := tf.next()) is not None:
                budget.count_member(member.name)
                yield _tar_entry(tf, member, limits)
    finally:
        if gz is not None:
            gz.close()


def _tar_entry(tf: tarfile.TarFile, member: tarfile.TarInfo, limits: ArchiveLimits) -> _Entry:
    name = member.name
    parts = _member_parts(name)
    if member.issym() or member.islnk():
        raise _unsafe(name, "symbolic or hard link")
    if member.ischr() or member.isblk() or member.isfifo():
        raise _unsafe(name, "device or fifo")
    if member.isdir():
        return _Entry(name, parts, is_dir=True)
    if not member.isreg() or member.issparse():
        raise _unsafe(name, f"unsupported tar member type {member.type!r}")
    if member.size > limits.max_member_bytes:
        raise DatasetError(f"archive member {name!r} declares {member.size} bytes, more than "
                           f"{limits.max_member_bytes}", code="archive_bomb")

    def read() -> bytes:
        fh = tf.extractfile(member)
        if fh is None:  # pragma: no cover - regular members always have a file object
            raise _unsafe(name, "no data")
        with fh:
            return _read_bounded(fh, name, limits.max_member_bytes)  # type: ignore[arg-type]

    return _Entry(name, parts, is_dir=False, read=read)


# ----------------------------------------------------------------------------------------------------
# Directory on disk


def _dir_entries(root: Path, directory: Path, prefix: tuple[str, ...], limits: ArchiveLimits,
                 budget: _Budget) -> Iterator[_Entry]:
    """Entries under ``directory`` (depth-first, sorted, at most 3 levels deep; deeper is a layout error)."""
    try:
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {'/'.join(prefix) or str(root)!r}: {exc.strerror}") from exc
    for item in items:
        rel = "/".join((*prefix, item.name))
        budget.count_member(rel)
        parts = _member_parts(rel)
        if _is_junk(parts):  # not even resolved or stat'ed: editor lock files are dangling symlinks
            continue
        target = _inside(root, Path(item.path), rel)
        try:
            mode = target.stat().st_mode
        except OSError as exc:
            raise DatasetError(f"cannot read {rel!r}: {exc.strerror}") from exc
        if stat.S_ISDIR(mode):
            yield _Entry(rel, parts, is_dir=True)
            if len(parts) < 3:
                yield from _dir_entries(root, target, (*prefix, item.name), limits, budget)
        elif stat.S_ISREG(mode):
            yield _Entry(rel, parts, is_dir=False, read=_file_reader(target, rel, limits.max_member_bytes))
        else:
            raise _unsafe(rel, "device, fifo or socket")


def _inside(root: Path, path: Path, rel: str) -> Path:
    """Resolve ``path`` (following symlinks) and refuse it unless it stays inside ``root``."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise _unsafe(rel, "broken or looping symbolic link") from exc
    if not target.is_relative_to(root) or target == root:
        raise _unsafe(rel, "symbolic link pointing outside the dataset directory")
    return target


def _file_reader(target: Path, rel: str, cap: int) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise DatasetError(f"cannot read {rel!r}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise _unsafe(rel, "not a regular file")
            try:
                return _read_bounded(fh, rel, cap)
            except OSError as exc:
                raise DatasetError(f"cannot read {rel!r}: {exc.strerror}") from exc

    return read


# ----------------------------------------------------------------------------------------------------
# From entries to labelled images


@dataclass
class _Decoded:
    parts: tuple[str, ...]
    name: str
    image: np.ndarray  # uint8 (H, W, 3)


@dataclass
class _Collected:
    files: list[_Decoded] = field(default_factory=list)
    dirs: dict[tuple[str, ...], str] = field(default_factory=dict)  # folder parts -> name (or implied)
    bad: list[tuple[tuple[str, ...], str, str]] = field(default_factory=list)  # (parts, name, error code)


def _build(entries: Iterable[_Entry], image_size: tuple[int, int] | None, limits: ArchiveLimits,
           allowed_classes: list[str] | None, budget: _Budget) -> LabelledImages:
    """Read and decode every entry, then check the layout and assemble the labelled arrays."""
    got = _collect(entries, image_size, limits, budget)
    strip = _common_top(got)
    by_class = _group_by_class(got, strip)
    if got.bad:
        shown = [f"{name!r} ({code})" for _, name, code in got.bad]
        raise DatasetError(f"{len(got.bad)} file(s) are not usable images: {_listing(shown)}",
                           code="invalid_dataset_image")
    _check_classes(got, strip, by_class)
    classes, index = _class_order(by_class, allowed_classes)
    small = [f"{c!r} ({len(v)})" for c, v in sorted(by_class.items()) if len(v) < limits.min_per_class]
    if small:
        raise DatasetError(f"classes with fewer than {limits.min_per_class} images: {_listing(small)}",
                           code="invalid_dataset_layout")
    samples = [(index[c], _fold("/".join(d.parts)), d) for c in by_class for d in by_class[c]]
    samples.sort(key=lambda s: (s[0], s[1]))
    shapes = {d.image.shape for _, _, d in samples}
    if len(shapes) > 1:
        examples = {}
        for _, _, d in samples:
            examples.setdefault(d.image.shape, d.name)
        shown = [f"{n!r} is {s[1]}x{s[0]}" for s, n in list(examples.items())[:3]]
        raise DatasetError(f"images have different sizes ({'; '.join(shown)}); pass an image size",
                           code="invalid_dataset_image")
    images = np.stack([d.image for _, _, d in samples]).astype(np.uint8, copy=False)
    labels = np.array([lab for lab, _, _ in samples], dtype=np.int64)
    return LabelledImages(images, labels, classes)


def _collect(entries: Iterable[_Entry], image_size: tuple[int, int] | None, limits: ArchiveLimits,
             budget: _Budget) -> _Collected:
    """Skip junk, refuse duplicates and misplaced files early, read (capped) and decode the rest."""
    got = _Collected()
    seen: dict[str, str] = {}
    for entry in entries:
        for depth in range(1, len(entry.parts)):  # folders implied by the path, even when only junk is inside
            folder = entry.parts[:depth]
            if not _is_junk(folder):
                got.dirs.setdefault(folder, "/".join(folder) + "/")
        if not entry.parts or _is_junk(entry.parts):
            continue
        if entry.is_dir:
            got.dirs.setdefault(entry.parts, entry.name)
            continue
        key = _fold("/".join(entry.parts))
        if key in seen:
            raise DatasetError(f"members {seen[key]!r} and {entry.name!r} have the same name (ignoring case)",
                               code="duplicate_member")
        seen[key] = entry.name
        if len(entry.parts) == 1:
            raise DatasetError(f"file {entry.name!r} is at the archive root; expected class_name/file",
                               code="invalid_dataset_layout")
        if len(entry.parts) > 3:
            raise DatasetError(f"file {entry.name!r} is nested too deep; expected class_name/file",
                               code="invalid_dataset_layout")
        assert entry.read is not None
        data = entry.read()
        budget.add_bytes(len(data), entry.name)
        try:
            image = decode_image(data, image_size, limits.max_pixels)
        except ImageError as exc:
            got.bad.append((entry.parts, entry.name, exc.code))
            continue
        budget.add_decoded(image.nbytes, entry.name)
        got.files.append(_Decoded(entry.parts, entry.name, image))
    return got


def _common_top(got: _Collected) -> int:
    """1 when every entry sits under one top folder and some file is three levels deep, else 0."""
    files = [d.parts for d in got.files] + [parts for parts, _, _ in got.bad]
    tops = {parts[0] for parts in files} | {parts[0] for parts in got.dirs}
    deep = any(len(parts) >= 3 for parts in files)
    return 1 if len(tops) == 1 and deep else 0


def _group_by_class(got: _Collected, strip: int) -> dict[str, list[_Decoded]]:
    """Group decoded files by class folder, refusing files at the root and nested folders."""
    positions = [(d.parts, d.name) for d in got.files] + [(parts, name) for parts, name, _ in got.bad]
    for parts, name in positions:
        rel = parts[strip:]
        if len(rel) != 2:
            where = "at the root" if len(rel) < 2 else "nested too deep"
            raise DatasetError(f"file {name!r} is {where}; expected class_name/file",
                               code="invalid_dataset_layout")
    for parts, name in got.dirs.items():
        if len(parts[strip:]) > 1:
            raise DatasetError(f"folder {name!r} is nested inside a class folder; expected class_name/file",
                               code="invalid_dataset_layout")
    by_class: dict[str, list[_Decoded]] = {}
    for d in got.files:
        by_class.setdefault(d.parts[strip], []).append(d)
    return by_class


def _check_classes(got: _Collected, strip: int, by_class: dict[str, list[_Decoded]]) -> None:
    """Refuse empty class folders, class names equal but for case, and fewer than two classes."""
    empty = sorted({parts[strip] for parts in got.dirs if len(parts) == strip + 1} - set(by_class))
    if empty:
        raise DatasetError(f"class folders without images: {_listing([repr(c) for c in empty])}",
                           code="invalid_dataset_layout")
    folded: dict[str, str] = {}
    for c in sorted(by_class):
        if _fold(c) in folded:
            raise DatasetError(f"class folders {folded[_fold(c)]!r} and {c!r} differ only by case",
                               code="duplicate_member")
        folded[_fold(c)] = c
    if len(by_class) < 2:
        found = ", ".join(repr(c) for c in sorted(by_class)) or "none"
        raise DatasetError(f"need at least 2 class folders with images, found {len(by_class)} ({found})",
                           code="invalid_dataset_layout")


def _class_order(by_class: dict[str, list[_Decoded]], allowed_classes: list[str] | None
                 ) -> tuple[list[str], dict[str, int]]:
    """The class list and the label of each found class: sorted, or the model's order (which must match)."""
    if allowed_classes is None:
        classes = sorted(by_class)
        return classes, {c: i for i, c in enumerate(classes)}
    wanted = {_nfc(c): i for i, c in enumerate(allowed_classes)}
    extra = sorted(c for c in by_class if c not in wanted)
    missing = sorted(c for c in wanted if c not in by_class)
    if extra or missing:
        said = []
        if extra:
            said.append(f"not in the model: {_listing([repr(c) for c in extra])}")
        if missing:
            said.append(f"missing from the archive: {_listing([repr(c) for c in missing])}")
        raise DatasetError(f"archive classes differ from the model's classes; {'; '.join(said)}",
                           code="class_set_mismatch")
    return list(allowed_classes), {c: wanted[c] for c in by_class}


def _listing(items: list[str]) -> str:
    """The first few items, comma separated, with a count of the rest."""
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"
