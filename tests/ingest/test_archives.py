"""ImageFolder archives and directories: layout, limits and hostile members (research 2f, A3-A11)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import time
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.ingest.archives import ArchiveLimits, read_image_folder_archive, read_image_folder_dir
from service.ingest.labelled import DatasetError, LabelledImages

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "bird": (0, 0, 255)}


def png(colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    data = bytearray(png())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def dataset(top: str = "", classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> dict[str, bytes]:
    return {f"{top}{c}/{i}.png": png(COLOURS[c]) for c in classes for i in range(per_class)}


def make_zip(members: dict[str, bytes], dirs: tuple[str, ...] = (),
             method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes], gz: bool = True, extra: tuple[tarfile.TarInfo, ...] = (),
             dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def read(data: bytes, name: str = "data.zip", **kwargs: object) -> LabelledImages:
    return read_image_folder_archive(io.BytesIO(data), name, **kwargs)  # type: ignore[arg-type]


def expect(data: bytes, code: str, *mentions: str, **kwargs: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        read(data, **kwargs)
    assert info.value.code == code, str(info.value)
    for text in mentions:
        assert text in str(info.value), str(info.value)
    return info.value


ARCHIVERS = {"zip": make_zip, "tar.gz": make_tar, "tar": lambda m: make_tar(m, gz=False)}


# ------------------------------------------------------------------------------------------------------
# Valid archives


@pytest.mark.parametrize("kind", sorted(ARCHIVERS))
@pytest.mark.parametrize("top", ["", "my_data/"])
def test_valid_archive(kind: str, top: str) -> None:
    members = dataset(top, classes=("dog", "cat", "bird"))
    members[f"__MACOSX/{top}cat/._0.png"] = b"apple double junk"
    members[f"{top}cat/.DS_Store"] = b"junk"
    members[".DS_Store"] = b"junk"
    members[f"{top}dog/Thumbs.db"] = b"junk"
    out = read(ARCHIVERS[kind](members), name=f"x.{kind}")
    assert out.classes == ["bird", "cat", "dog"]
    assert out.images.shape == (6, 4, 4, 3) and out.images.dtype == np.uint8
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(out.images, out.labels, strict=True):
        assert tuple(image[0, 0]) == COLOURS[out.classes[label]]


def test_type_comes_from_magic_bytes_not_the_name() -> None:
    assert len(read(make_zip(dataset()), name="looks_like.tar.gz")) == 4
    assert len(read(make_tar(dataset()), name="looks_like.zip")) == 4


def test_tar_with_dot_slash_prefix_and_directory_entries() -> None:
    members = {f"./{k}": v for k, v in dataset().items()}
    out = read(make_tar(members, dirs=("./", "./cat", "./dog")))
    assert out.classes == ["cat", "dog"] and len(out) == 4


def test_zip_with_directory_entries_and_stored_members() -> None:
    out = read(make_zip(dataset("top/"), dirs=("top/", "top/cat/", "top/dog/"), method=zipfile.ZIP_STORED))
    assert out.classes == ["cat", "dog"]


def test_image_size_resizes_mixed_sizes() -> None:
    members = {"cat/a.png": png(size=(4, 4)), "dog/b.png": png(size=(8, 6))}
    err = expect(make_zip(members), "invalid_dataset_image", "pass an image size")
    assert "cat/a.png" in str(err) or "dog/b.png" in str(err)
    out = read(make_zip(members), image_size=(5, 3))
    assert out.images.shape == (2, 5, 3, 3)


def test_allowed_classes_fix_the_label_order() -> None:
    out = read(make_zip(dataset()), allowed_classes=["dog", "cat"])
    assert out.classes == ["dog", "cat"]
    assert out.labels.tolist() == [0, 0, 1, 1]  # samples are ordered by label, then path
    assert tuple(out.images[0, 0, 0]) == COLOURS["dog"]
    assert tuple(out.images[2, 0, 0]) == COLOURS["cat"]


def test_class_names_are_nfc_normalised() -> None:
    nfd = unicodedata.normalize("NFD", "café")
    members = {f"{nfd}/a.png": png(), "dog/a.png": png()}
    out = read(make_zip(members), allowed_classes=["café", "dog"])
    assert out.classes == ["café", "dog"]


# ------------------------------------------------------------------------------------------------------
# Unsafe members


@pytest.mark.parametrize(
    "name",
    ["../evil.png", "/abs/x.png", "C:\\x.png", "C:/x.png", "a\\..\\..\\b.png", "cat/../../x.png",
     "../staging-evil/x.png", "cat/con.png", "cat/\x07bell.png"],
)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_unsafe_names(kind: str, name: str) -> None:
    members = {**dataset(), name: png()}
    expect(ARCHIVERS[kind](members), "unsafe_archive_member", repr(name)[1:-1][:10])


def test_nul_in_zip_name() -> None:
    data = make_zip({**dataset(), "cat/aXb.png": png()}).replace(b"cat/aXb.png", b"cat/a\x00b.png")
    expect(data, "unsafe_archive_member", "NUL")


def test_symlink_in_zip() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in dataset().items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("cat/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    expect(buf.getvalue(), "unsafe_archive_member", "cat/link.png", "symbolic link")


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "info",
    [_special("cat/link.png", tarfile.SYMTYPE, "/etc/passwd"),
     _special("cat/hard.png", tarfile.LNKTYPE, "cat/0.png"),
     _special("cat/dev.png", tarfile.CHRTYPE),
     _special("cat/blk.png", tarfile.BLKTYPE),
     _special("cat/fifo.png", tarfile.FIFOTYPE)],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo"],
)
def test_links_and_devices_in_tar(info: tarfile.TarInfo) -> None:
    expect(make_tar(dataset(), extra=(info,)), "unsafe_archive_member", info.name)


# ------------------------------------------------------------------------------------------------------
# Bombs and counts


def test_zip_member_over_the_byte_cap_stops_early() -> None:
    data = make_zip({**dataset(), "cat/bomb.png": bytes(20 * 2**20)})
    start = time.perf_counter()
    expect(data, "archive_bomb", "cat/bomb.png", limits=ArchiveLimits(max_member_bytes=2**20))
    assert time.perf_counter() - start < 2.0


def test_zip_compression_ratio_cap() -> None:
    expect(make_zip({**dataset(), "cat/zeros.png": bytes(4 * 2**20)}), "archive_bomb", "ratio")


def test_total_bytes_cap() -> None:
    noise = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    members = {"cat/a.png": noise, "dog/b.png": noise + b"x"}
    expect(make_zip(members), "archive_bomb", "in total", limits=ArchiveLimits(max_total_bytes=500_000))


def test_decoded_bytes_cap() -> None:
    expect(make_zip(dataset()), "archive_bomb", "decoded", limits=ArchiveLimits(max_decoded_bytes=100))


def test_tar_member_over_the_byte_cap_is_refused_from_its_header() -> None:
    expect(make_tar({**dataset(), "cat/bomb.png": bytes(4 * 2**20)}), "archive_bomb", "cat/bomb.png",
           limits=ArchiveLimits(max_member_bytes=2**20))


def test_tar_gz_stream_ratio_cap() -> None:
    expect(make_tar({**dataset(), "cat/zeros.png": bytes(4 * 2**20)}), "archive_bomb", "ratio")


def test_overlapping_zip_members() -> None:
    data = bytearray(make_zip({"cat/a.png": png(), "dog/b.png": png()}))
    first = data.index(b"PK\x01\x02")  # central directory records
    second = data.index(b"PK\x01\x02", first + 4)
    data[second + 42:second + 46] = struct.pack("<I", 0)  # second entry now points at the first one's data
    expect(bytes(data), "archive_bomb", "overlap")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_too_many_members(kind: str) -> None:
    members = dataset(classes=("cat", "dog"), per_class=6)
    expect(ARCHIVERS[kind](members), "too_many_files", limits=ArchiveLimits(max_members=10))


def test_directories_count_as_members() -> None:
    dirs = tuple(f"cat/d{i}/" for i in range(10))
    expect(make_zip(dataset(), dirs=dirs), "too_many_files", limits=ArchiveLimits(max_members=12))


# ------------------------------------------------------------------------------------------------------
# Layout


def test_file_at_root() -> None:
    expect(make_zip({**dataset(), "x.png": png()}), "invalid_dataset_layout", "x.png", "root")


def test_file_at_root_of_the_common_top_folder() -> None:
    expect(make_zip({**dataset("top/"), "top/x.png": png()}), "invalid_dataset_layout", "top/x.png", "root")


def test_too_deep() -> None:
    expect(make_zip({**dataset(), "cat/sub/x.png": png()}), "invalid_dataset_layout", "cat/sub/x.png")
    expect(make_zip({**dataset("top/"), "top/cat/sub/x.png": png()}), "invalid_dataset_layout", "nested")


def test_single_class() -> None:
    expect(make_zip(dataset(classes=("cat",))), "invalid_dataset_layout", "at least 2", "'cat'")
    expect(make_zip(dataset("top/", classes=("cat",))), "invalid_dataset_layout", "at least 2")


def test_empty_archive() -> None:
    expect(make_zip({}), "invalid_dataset_layout", "none")


def test_empty_class_folder() -> None:
    expect(make_zip(dataset(), dirs=("bird/",)), "invalid_dataset_layout", "'bird'")
    expect(make_zip({**dataset(), "bird/.DS_Store": b"junk"}), "invalid_dataset_layout", "'bird'")


def test_min_per_class() -> None:
    members = {**dataset(classes=("cat",), per_class=3), "dog/0.png": png()}
    expect(make_zip(members), "invalid_dataset_layout", "'dog' (1)", limits=ArchiveLimits(min_per_class=2))


def test_class_mismatch_names_the_differences() -> None:
    err = expect(make_zip(dataset()), "class_set_mismatch", "'bird'", allowed_classes=["cat", "dog", "bird"])
    assert "missing" in str(err)
    err = expect(make_zip(dataset()), "class_set_mismatch", "'dog'", allowed_classes=["cat", "horse"])
    assert "not in the model" in str(err) and "'horse'" in str(err)


def test_bad_images_are_listed() -> None:
    members = {**dataset(), "cat/bad.png": b"not an image", "dog/bomb.png": bomb_png()}
    err = expect(make_zip(members), "invalid_dataset_image", "cat/bad.png", "dog/bomb.png", "image_too_large")
    assert "2 file(s)" in str(err)


def test_disallowed_image_format_inside() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "TIFF")
    expect(make_zip({**dataset(), "cat/x.tif": buf.getvalue()}), "invalid_dataset_image",
           "unsupported_image_format")


def test_duplicate_names_differing_by_case() -> None:
    expect(make_zip({**dataset(), "cat/A.png": png(), "cat/a.png": png()}), "duplicate_member", "cat/a.png")


def test_duplicate_names_differing_by_normalisation() -> None:
    nfc, nfd = "cat/é.png", unicodedata.normalize("NFD", "cat/é.png")
    assert nfc != nfd
    expect(make_tar({**dataset(), nfc: png(), nfd: png()}), "duplicate_member")


def test_class_folders_differing_by_case() -> None:
    expect(make_zip({**dataset(), "Cat/x.png": png()}), "duplicate_member", "'Cat'", "'cat'")


# ------------------------------------------------------------------------------------------------------
# Corrupt or foreign containers


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"PK\x03\x04" + b"\x00" * 100, b"\x1f\x8b" + b"garbage" * 20, b"BZh91AY&SY",
     b"Rar!\x1a\x07\x00", bytes(1024)],
    ids=["empty", "text", "zip-garbage", "gzip-garbage", "bzip2", "rar", "zeros"],
)
def test_corrupt_or_unsupported_containers(data: bytes) -> None:
    expect(data, "unsupported_archive")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archives(kind: str) -> None:
    data = ARCHIVERS[kind](dataset(per_class=4))
    with pytest.raises(DatasetError) as info:
        read(data[: len(data) * 2 // 3])
    assert info.value.code in {"unsupported_archive", "invalid_dataset_layout", "invalid_dataset_image"}


def test_zip_with_a_bad_crc() -> None:
    members = dataset()
    members["cat/0.png"] = b"A" * 64
    data = bytearray(make_zip(members, method=zipfile.ZIP_STORED))
    data[data.index(b"A" * 64)] = ord("B")
    expect(bytes(data), "unsupported_archive", "CRC")


def test_gzip_that_is_not_a_tar() -> None:
    expect(gzip.compress(b"just some text" * 100), "unsupported_archive")


# ------------------------------------------------------------------------------------------------------
# Directories on disk


def write_tree(root: Path, members: dict[str, bytes]) -> None:
    for name, data in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_directory(tmp_path: Path) -> None:
    write_tree(tmp_path / "ds", {**dataset("top/"), "top/.hidden/x": b"junk", ".DS_Store": b"junk"})
    out = read_image_folder_dir(tmp_path / "ds")
    assert out.classes == ["cat", "dog"] and len(out) == 4


def test_directory_symlink_inside_is_followed(tmp_path: Path) -> None:
    write_tree(tmp_path, dataset())
    (tmp_path / "cat" / "link.png").symlink_to(tmp_path / "dog" / "0.png")
    out = read_image_folder_dir(tmp_path)
    assert len(out) == 5


def test_directory_symlink_outside_is_refused(tmp_path: Path) -> None:
    write_tree(tmp_path / "ds", dataset())
    (tmp_path / "secret.png").write_bytes(png())
    (tmp_path / "ds" / "cat" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DatasetError) as info:
        read_image_folder_dir(tmp_path / "ds")
    assert info.value.code == "unsafe_archive_member" and "cat/link.png" in str(info.value)


def test_directory_sibling_prefix_symlink_is_refused(tmp_path: Path) -> None:
    write_tree(tmp_path / "ds", dataset())
    write_tree(tmp_path / "ds-evil", {"x.png": png()})
    (tmp_path / "ds" / "cat" / "link.png").symlink_to(tmp_path / "ds-evil" / "x.png")
    with pytest.raises(DatasetError) as info:
        read_image_folder_dir(tmp_path / "ds")
    assert info.value.code == "unsafe_archive_member"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no fifos here")
def test_directory_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    write_tree(tmp_path, dataset())
    os.mkfifo(tmp_path / "cat" / "pipe.png")
    with pytest.raises(DatasetError) as info:
        read_image_folder_dir(tmp_path)
    assert info.value.code == "unsafe_archive_member"


def test_directory_junk_is_never_opened(tmp_path: Path) -> None:
    write_tree(tmp_path, dataset())
    (tmp_path / "cat" / ".#lock").symlink_to("/nonexistent/elsewhere")  # editor lock: a dangling link
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "dog" / ".pipe")
    assert len(read_image_folder_dir(tmp_path)) == 4


def test_bad_image_size_argument_is_a_caller_error() -> None:
    with pytest.raises(ValueError) as info:
        read(make_zip(dataset()), image_size=(0, 4))
    assert not isinstance(info.value, DatasetError)


def test_directory_layout_errors(tmp_path: Path) -> None:
    write_tree(tmp_path, {**dataset(), "README.txt": b"hi"})
    with pytest.raises(DatasetError) as info:
        read_image_folder_dir(tmp_path)
    assert info.value.code == "invalid_dataset_layout"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        read_image_folder_dir(tmp_path / "nope")


def test_sources_load_dataset_reads_archives_and_directories(tmp_path: Path) -> None:
    from service.ingest.sources import load_dataset

    (tmp_path / "d.zip").write_bytes(make_zip(dataset()))
    (tmp_path / "d.tar.gz").write_bytes(make_tar(dataset()))
    write_tree(tmp_path / "dir", dataset())
    for src in ("d.zip", "d.tar.gz", "dir"):
        assert load_dataset(tmp_path / src, image_size=(2, 2)).images.shape == (4, 2, 2, 3)


def test_limits_presets() -> None:
    cli, upload = ArchiveLimits.for_cli(), ArchiveLimits.for_upload()
    assert cli.max_members >= upload.max_members and cli.max_total_bytes >= upload.max_total_bytes
    with pytest.raises(ValueError):
        ArchiveLimits(max_members=0)


# ------------------------------------------------------------------------------------------------------
# Fuzz: mutated archives raise DatasetError and nothing else

FUZZ_SEEDS = [make_zip(dataset()), make_tar(dataset()), make_tar(dataset(), gz=False)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(FUZZ_SEEDS),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_fuzz_mutated_archives(seed: bytes, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        out = read(bytes(data), limits=ArchiveLimits(max_member_bytes=2**20, max_total_bytes=4 * 2**20))
    except DatasetError as exc:
        assert exc.code
    else:
        assert out.images.dtype == np.uint8 and len(out.labels) == len(out.images)
