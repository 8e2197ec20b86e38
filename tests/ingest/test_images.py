"""Untrusted image decoding: formats, modes, sizes and every way the bytes can be bad (research 2f)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from service.ingest.images import ALLOWED_FORMATS, STATUS_BY_CODE, ImageError, decode_image, sniff_format

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)


def encode(im: Image.Image | np.ndarray, fmt: str, **kwargs: object) -> bytes:
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to declare ``width x height`` (CRC fixed up)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def expect_error(data: bytes, code: str, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == code, str(info.value)
    assert info.value.status == STATUS_BY_CODE[code]
    return info.value


# ------------------------------------------------------------------------------------------------------
# Valid images


def test_png_round_trip_is_exact() -> None:
    out = decode_image(encode(PIXELS, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (10, 14, 3)
    np.testing.assert_array_equal(out, PIXELS)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF"])
def test_other_allowed_formats_decode(fmt: str) -> None:
    smooth = np.full((10, 14, 3), (200, 40, 90), dtype=np.uint8)
    out = decode_image(encode(smooth, fmt))
    assert out.shape == (10, 14, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth.astype(int)).mean() < 12


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"), ("P", "GIF"),
     ("RGBA", "WEBP")],
)
def test_modes_are_converted_to_rgb(mode: str, fmt: str) -> None:
    out = decode_image(encode(Image.fromarray(PIXELS).convert(mode), fmt))
    assert out.shape == (10, 14, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_alpha_is_composited_on_black() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 255
    rgba[1, :, 3] = 128
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [200, 200, 200]
    assert abs(int(out[1, 0, 0]) - 100) <= 1


def test_palette_with_transparency_is_composited() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    out = decode_image(encode(im, "PNG", transparency=0))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [0, 255, 0]


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out[0, :, 0].tolist() == [0, 100, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_resize_to_height_width() -> None:
    data = encode(PIXELS, "PNG")
    assert decode_image(data, size=(5, 7)).shape == (5, 7, 3)
    np.testing.assert_array_equal(decode_image(data, size=(10, 14)), PIXELS)


def test_animated_gif_gives_first_frame() -> None:
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    blue = Image.new("RGB", (4, 4), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data)
    assert out[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(np.zeros((10, 20, 3), np.uint8), "JPEG", exif=exif)
    assert decode_image(data).shape == (20, 10, 3)


def test_bad_arguments_are_caller_errors() -> None:
    data = encode(PIXELS, "PNG")
    with pytest.raises(ValueError):
        decode_image(data, size=(0, 5))
    with pytest.raises(ValueError):
        decode_image(data, max_pixels=0)


# ------------------------------------------------------------------------------------------------------
# Bad bytes


def test_empty() -> None:
    expect_error(b"", "empty_image")


@pytest.mark.parametrize("data", [b"hello world, not an image", bytes(range(256)), b"\x00" * 64])
def test_not_an_image(data: bytes) -> None:
    expect_error(data, "not_an_image")


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "PDF", "EPS", "JPEG2000"])
def test_disallowed_formats_are_refused_without_decoding(fmt: str) -> None:
    assert fmt not in ALLOWED_FORMATS
    try:
        data = encode(Image.fromarray(PIXELS), fmt)
    except (OSError, KeyError) as exc:  # encoder not built into this Pillow
        pytest.skip(f"cannot write {fmt}: {exc}")
    err = expect_error(data, "unsupported_image_format")
    assert "not accepted" in str(err)


@pytest.mark.parametrize("magic", [b"8BPS\x00\x01", b"SIMPLE  =                    T", b"%PDF-1.4\n"])
def test_dangerous_formats_are_recognised_by_magic(magic: bytes) -> None:
    expect_error(magic + b"\x00" * 64, "unsupported_image_format")


def test_sniff_format() -> None:
    assert sniff_format(encode(PIXELS, "PNG")) == "PNG"
    assert sniff_format(encode(PIXELS, "WEBP")) == "WEBP"
    assert sniff_format(b"nothing") is None


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = encode(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), fmt)
    expect_error(data[: len(data) // 2], "truncated_image")


def test_truncation_is_an_error_even_if_the_global_was_flipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), "PNG")
    expect_error(data[: len(data) // 2], "truncated_image")


def test_corrupt_header_of_an_allowed_format() -> None:
    expect_error(encode(PIXELS, "PNG")[:30], "invalid_image")


@pytest.mark.parametrize("side", [5000, 10_000, 100_000])
def test_pixel_bombs_are_refused_before_decoding(side: int) -> None:
    # 5000^2 is over our 4096^2 cap but under Pillow's; 10000^2 trips Pillow's warning; 100000^2 its error.
    start = time.perf_counter()
    err = expect_error(png_claiming(side, side), "image_too_large")
    assert err.status == 413
    assert time.perf_counter() - start < 1.0


def test_max_pixels_is_configurable() -> None:
    data = encode(PIXELS, "PNG")
    expect_error(data, "image_too_large", max_pixels=10 * 14 - 1)
    assert decode_image(data, max_pixels=10 * 14).shape == (10, 14, 3)


def test_zero_width_is_refused() -> None:
    with pytest.raises(ImageError):
        decode_image(png_claiming(0, 1))


# ------------------------------------------------------------------------------------------------------
# Fuzz: no input raises anything but ImageError


SEEDS = [encode(PIXELS[:6, :6], fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]


def _decode_or_image_error(data: bytes) -> None:
    try:
        out = decode_image(data, max_pixels=256 * 256)
    except ImageError as exc:
        assert exc.code in STATUS_BY_CODE
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_image_error(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_fuzz_mutated_images(seed: bytes, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_image_error(bytes(data))
