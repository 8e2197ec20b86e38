"""From checked entries to labelled images: decode each image, check the ImageFolder layout
(``class_name/file.ext``, one optional common top folder) and the class set, assemble the arrays."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np

from service.ingest.images import ImageError, decode_image
from service.ingest.labelled import DatasetError, LabelledImages
from service.ingest.members import Budget, Entry, fold, is_junk, nfc
from service.ingest.preprocessing import Preprocessing

if TYPE_CHECKING:
    from service.ingest.archives import ArchiveLimits

_LISTED: Final[int] = 10  # how many offending names an error message lists


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


def build(entries: Iterable[Entry], image_size: tuple[int, int] | Preprocessing | None, limits: ArchiveLimits,
           allowed_classes: list[str] | None, budget: Budget) -> LabelledImages:
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
    samples = [(index[c], fold("/".join(d.parts)), d) for c in by_class for d in by_class[c]]
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


def _collect(entries: Iterable[Entry], image_size: tuple[int, int] | Preprocessing | None, limits: ArchiveLimits,
             budget: Budget) -> _Collected:
    """Skip junk, refuse duplicates and misplaced files early, read (capped) and decode the rest."""
    got = _Collected()
    seen: dict[str, str] = {}
    for entry in entries:
        for depth in range(1, len(entry.parts)):  # folders implied by the path, even when only junk is inside
            folder = entry.parts[:depth]
            if not is_junk(folder):
                got.dirs.setdefault(folder, "/".join(folder) + "/")
        if not entry.parts or is_junk(entry.parts):
            continue
        if entry.is_dir:
            got.dirs.setdefault(entry.parts, entry.name)
            continue
        key = fold("/".join(entry.parts))
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
        if fold(c) in folded:
            raise DatasetError(f"class folders {folded[fold(c)]!r} and {c!r} differ only by case",
                               code="duplicate_member")
        folded[fold(c)] = c
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
    wanted = {nfc(c): i for i, c in enumerate(allowed_classes)}
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

