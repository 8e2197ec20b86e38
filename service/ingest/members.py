"""Archive members and dataset-directory items as checked entries: safe names, capped reads, and the
readers of zip, tar (optionally gzip) and directories. The rules are listed in :mod:`service.ingest.archives`."""

from __future__ import annotations

import gzip
import itertools
import os
import re
import stat
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from service.ingest.labelled import DatasetError

if TYPE_CHECKING:
    from service.ingest.archives import ArchiveLimits

MiB: Final[int] = 1 << 20

_READ_CHUNK: Final[int] = 1 * MiB
# The ratio cap is only applied once this many bytes came out: tiny members compress arbitrarily well.
_RATIO_FLOOR: Final[int] = 1 * MiB
# Tar headers and padding allowed on top of member data in the decompressed stream, per member.
_TAR_OVERHEAD_PER_MEMBER: Final[int] = 2048

_ZIP_METHODS: Final[frozenset[int]] = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_WINDOWS_DEVICES: Final[frozenset[str]] = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
)
_JUNK_FILES: Final[frozenset[str]] = frozenset({"thumbs.db", "desktop.ini"})
_DRIVE: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z]:")


# ----------------------------------------------------------------------------------------------------
# Entries: one per archive member or directory item, with checked path components.


@dataclass
class Entry:
    """One member: ``name`` as stored (for messages), safe NFC ``parts``, and how to read its bytes.

    For tar streams ``read`` is only valid until the iterator advances; :func:`build` calls it at once.
    """

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    read: Callable[[], bytes] | None = None


@dataclass
class Budget:
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


def unsafe(name: str, why: str) -> DatasetError:
    return DatasetError(f"unsafe archive member {name!r}: {why}", code="unsafe_archive_member")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def fold(text: str) -> str:
    """Caseless key: NFC, case folded, NFC again."""
    return nfc(nfc(text).casefold())


def member_parts(name: str) -> tuple[str, ...]:
    """Split a member name into NFC path components, refusing every unsafe form.

    ``.`` and empty components are dropped (``./cat/x.png`` is ``cat/x.png``); an empty result is the root.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise unsafe(name, "control character or NUL in the name")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise unsafe(name, "the name is not valid UTF-8")
    if "\\" in name:
        raise unsafe(name, "backslash in the name")
    if name.startswith("/"):
        raise unsafe(name, "absolute path")
    if _DRIVE.match(name):
        raise unsafe(name, "drive letter")
    parts = tuple(nfc(p) for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise unsafe(name, "'..' in the path")
    if len(name) > 4096 or any(len(p.encode("utf-8")) > 255 for p in parts):
        raise unsafe(name, "name too long")
    for part in parts:
        if part.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
            raise unsafe(name, f"reserved device name {part!r}")
    return parts


def is_junk(parts: tuple[str, ...]) -> bool:
    """OS metadata that is skipped silently: ``__MACOSX/``, hidden entries, ``Thumbs.db``, ``desktop.ini``."""
    return (any(p == "__MACOSX" or p.startswith(".") for p in parts)
            or parts[-1].casefold() in _JUNK_FILES)


def read_bounded(fh: BinaryIO, name: str, cap: int) -> bytes:
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


# ----------------------------------------------------------------------------------------------------
# Zip


def zip_entries(fileobj: BinaryIO, limits: ArchiveLimits, budget: Budget) -> Iterator[Entry]:
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


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> Entry:
    name = info.filename
    if info.orig_filename != name:
        raise unsafe(info.orig_filename, "NUL in the name")
    parts = member_parts(name)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise unsafe(name, "symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise unsafe(name, "device, fifo or socket")
    if info.is_dir() or kind == stat.S_IFDIR:
        return Entry(name, parts, is_dir=True)
    if info.flag_bits & 0x1:
        raise DatasetError(f"archive member {name!r} is encrypted", code="unsupported_archive")
    if info.compress_type not in _ZIP_METHODS:
        raise DatasetError(f"archive member {name!r} uses unsupported compression method "
                           f"{info.compress_type}", code="unsupported_archive")

    def read() -> bytes:
        with zf.open(info) as fh:
            data = read_bounded(fh, name, limits.max_member_bytes)  # type: ignore[arg-type]
        if len(data) > _RATIO_FLOOR and len(data) > limits.max_ratio * max(info.compress_size, 1):
            raise DatasetError(f"archive member {name!r} has a compression ratio over {limits.max_ratio:g}",
                               code="archive_bomb")
        return data

    return Entry(name, parts, is_dir=False, read=read)


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


def tar_entries(fileobj: BinaryIO, compressed: bool, limits: ArchiveLimits, budget: Budget
                 ) -> Iterator[Entry]:
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


def _tar_entry(tf: tarfile.TarFile, member: tarfile.TarInfo, limits: ArchiveLimits) -> Entry:
    name = member.name
    parts = member_parts(name)
    if member.issym() or member.islnk():
        raise unsafe(name, "symbolic or hard link")
    if member.ischr() or member.isblk() or member.isfifo():
        raise unsafe(name, "device or fifo")
    if member.isdir():
        return Entry(name, parts, is_dir=True)
    if not member.isreg() or member.issparse():
        raise unsafe(name, f"unsupported tar member type {member.type!r}")
    if member.size > limits.max_member_bytes:
        raise DatasetError(f"archive member {name!r} declares {member.size} bytes, more than "
                           f"{limits.max_member_bytes}", code="archive_bomb")

    def read() -> bytes:
        fh = tf.extractfile(member)
        if fh is None:  # pragma: no cover - regular members always have a file object
            raise unsafe(name, "no data")
        with fh:
            return read_bounded(fh, name, limits.max_member_bytes)  # type: ignore[arg-type]

    return Entry(name, parts, is_dir=False, read=read)


# ----------------------------------------------------------------------------------------------------
# Directory on disk


def dataset_root(path: Path | str) -> Path:
    """The resolved ImageFolder directory ``path``, or a :class:`DatasetError` saying why it cannot be read."""
    try:
        root = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise DatasetError(f"{str(path)!r} cannot be opened (missing, unreadable or a symlink loop)") from exc
    if not root.is_dir():
        raise DatasetError(f"{str(path)!r} is not a directory")
    return root


def dir_entries(root: Path, directory: Path, prefix: tuple[str, ...], limits: ArchiveLimits,
                 budget: Budget) -> Iterator[Entry]:
    """Entries under ``directory`` (depth-first, sorted, at most 3 levels deep; deeper is a layout error)."""
    try:
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {'/'.join(prefix) or str(root)!r}: {exc.strerror}") from exc
    for item in items:
        rel = "/".join((*prefix, item.name))
        budget.count_member(rel)
        parts = member_parts(rel)
        if is_junk(parts):  # not even resolved or stat'ed: editor lock files are dangling symlinks
            continue
        target = _inside(root, Path(item.path), rel)
        try:
            mode = target.stat().st_mode
        except OSError as exc:
            raise DatasetError(f"cannot read {rel!r}: {exc.strerror}") from exc
        if stat.S_ISDIR(mode):
            yield Entry(rel, parts, is_dir=True)
            if len(parts) < 3:
                yield from dir_entries(root, target, (*prefix, item.name), limits, budget)
        elif stat.S_ISREG(mode):
            yield Entry(rel, parts, is_dir=False, read=_file_reader(target, rel, limits.max_member_bytes))
        else:
            raise unsafe(rel, "device, fifo or socket")


def _inside(root: Path, path: Path, rel: str) -> Path:
    """Resolve ``path`` (following symlinks) and refuse it unless it stays inside ``root``."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise unsafe(rel, "broken or looping symbolic link") from exc
    if not target.is_relative_to(root) or target == root:
        raise unsafe(rel, "symbolic link pointing outside the dataset directory")
    return target


def _file_reader(target: Path, rel: str, cap: int) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise DatasetError(f"cannot read {rel!r}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise unsafe(rel, "not a regular file")
            try:
                return read_bounded(fh, rel, cap)
            except OSError as exc:
                raise DatasetError(f"cannot read {rel!r}: {exc.strerror}") from exc

    return read


