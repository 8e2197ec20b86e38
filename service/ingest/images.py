"""Decode one untrusted image from memory into a ``uint8 (H, W, 3)`` RGB array.

Security rules (docs/design.md, "Untrusted input"):

- Decode from memory with Pillow; nothing touches the disk.
- Only the formats in :data:`ALLOWED_FORMATS` are ever handed to a Pillow decoder. Other formats are
  recognised by their magic bytes alone (no Pillow plugin runs) and refused with ``unsupported_image_format``.
- The pixel count ``width * height`` is checked against ``max_pixels`` from the header, *before* any pixel
  data is decoded; Pillow's ``DecompressionBombWarning`` is an error here, never a warning.
- ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept ``False``: a truncated file is an error, not a grey image.
- Animated images (GIF, WebP, APNG) give their first frame.
- The mode is converted to RGB explicitly: alpha is composited on black, 16/32-bit integer greys are scaled
  from the 16-bit range, float greys are clipped to ``[0, 255]``. The EXIF orientation is applied.
- Every failure caused by the bytes is an :class:`ImageError` with a stable ``code`` and an HTTP ``status``;
  no other exception type escapes for any input.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Final

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import ServiceError
from service.ingest.preprocessing import Preprocessing, as_preprocessing

# Formats whose Pillow decoders may run. TIFF is left out on purpose: it goes through libtiff with many
# codecs, multi-page files and a long CVE history, and the bad-input checklist (research 2f, P5) refuses it.
ALLOWED_FORMATS: Final[frozenset[str]] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})

DEFAULT_MAX_PIXELS: Final[int] = 4096 * 4096

# HTTP status the API answers with, per error code.
STATUS_BY_CODE: Final[dict[str, int]] = {
    "empty_image": 400,
    "not_an_image": 415,
    "unsupported_image_format": 415,
    "image_too_large": 413,
    "truncated_image": 422,
    "invalid_image": 422,
}

# Magic bytes of the allowed formats: a file that starts like one of these but that Pillow cannot identify is
# corrupt (``invalid_image``), not "not an image".
_ALLOWED_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)

# Magic bytes of well-known image (or image-like) formats we refuse. Recognised here, without Pillow, so
# that the refused format's parser never runs.
_REFUSED_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"SIMPLE  =", "FITS"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"\x01\xda", "SGI"),
    (b"gimp xcf", "XCF"),
    (b"#define", "XBM"),
    (b"/* XPM */", "XPM"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "HDR"),
)

# Everything Pillow (or zlib/struct underneath it) raises for malformed input.
_DECODE_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)


class ImageError(ServiceError, ValueError):
    """An uploaded image cannot be used.

    ``code`` is a stable machine-readable string (see :data:`STATUS_BY_CODE`) and ``status`` the HTTP status
    the API answers with. The message is for humans and contains no internals.
    """

    code = "invalid_image"
    status = 422
    STATUS_BY_CODE = STATUS_BY_CODE


def sniff_format(data: bytes) -> str | None:
    """Name the image format that ``data`` starts like, from magic bytes only (no decoder runs).

    Returns the format name (Pillow's name for allowed formats) or ``None`` when nothing matches.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        return "HEIF"
    for magic, name in _ALLOWED_MAGIC + _REFUSED_MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 2 and data[0:1] == b"P" and data[1] in b"1234567":
        return "PPM/PGM/PBM"
    return None


def decode_image(
    data: bytes, size: tuple[int, int] | Preprocessing | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode untrusted image bytes into an RGB array.

    Args:
        data: the encoded file, in memory.
        size: ``(height, width)`` to resize to with bilinear filtering, a :class:`Preprocessing` (the model's
            resize rule, e.g. resize the shorter side then centre-crop), or ``None`` to keep the decoded size.
        max_pixels: largest ``width * height`` accepted, checked from the header before decoding. Pillow's own
            bomb limit (``Image.MAX_IMAGE_PIXELS``) also applies and is never lifted: the cap used is the
            smaller of the two, so the check holds even where the warnings filter does not (below).

    Returns:
        ``uint8`` array of shape ``(H, W, 3)``: ``size`` if given, else the image's own size (after EXIF
        orientation). First frame only.

    Raises:
        ImageError: ``empty_image`` (no bytes), ``not_an_image`` (unrecognised bytes),
            ``unsupported_image_format`` (a known format outside :data:`ALLOWED_FORMATS`), ``image_too_large``
            (over ``max_pixels`` or a decompression bomb), ``truncated_image`` (data ends early) or
            ``invalid_image`` (anything else corrupt).
        ValueError: ``size`` or ``max_pixels`` is not positive (a caller bug, not bad input).

    Thread safety: safe to call from worker threads. ``warnings.catch_warnings`` is process-global on Python
    < 3.14, so under concurrency the bomb warning may briefly stay a warning; the explicit pixel check above
    still refuses the image, and Pillow's hard limit (twice its warning limit) raises regardless.
    """
    prep = None if size is None else as_preprocessing(size)  # ValueError for a bad (height, width)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if Image.MAX_IMAGE_PIXELS:
        max_pixels = min(max_pixels, int(Image.MAX_IMAGE_PIXELS))
    if not data:
        raise ImageError("the image is empty (0 bytes)", code="empty_image")
    # A module-wide Pillow switch: some other library may have flipped it. False is Pillow's default.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS)) as im:
                return _decode_opened(im, prep, max_pixels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("the image has too many pixels (decompression bomb)",
                         code="image_too_large") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except _DECODE_ERRORS as exc:
        raise _classify_decode_error(exc) from exc


def _decode_opened(im: Image.Image, prep: Preprocessing | None, max_pixels: int) -> np.ndarray:
    """Check an opened (not yet decoded) image, decode its first frame, convert to RGB and preprocess."""
    if im.format not in ALLOWED_FORMATS:  # Image.open(formats=...) already guarantees this; keep it explicit.
        raise ImageError(f"image format {im.format} is not accepted", code="unsupported_image_format")
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image declares an empty size {width}x{height}", code="invalid_image")
    if width * height > max_pixels:
        raise ImageError(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}",
                         code="image_too_large")
    im.load()
    if im.size != (width, height):
        raise ImageError("the decoded image size differs from its header", code="invalid_image")
    rgb = _to_rgb(_apply_exif_orientation(im))
    if prep is not None:
        rgb = prep.apply(rgb)
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError("the image could not be converted to RGB", code="invalid_image")
    return np.ascontiguousarray(arr)


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag, as a viewer would; a malformed EXIF block is ignored."""
    try:
        rotated = ImageOps.exif_transpose(im)
    except _DECODE_ERRORS:
        return im
    return rotated if rotated is not None else im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to ``RGB``; alpha (and palette transparency) is composited on black."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_grey_to_rgb(im)
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
    elif mode in ("LA", "La", "RGBa", "RGBA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im)
    return im.convert("RGB")


def _high_depth_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer grey is scaled from 0..65535 to 0..255; float grey is clipped to 0..255."""
    arr = np.asarray(im)
    if im.mode == "F":
        grey = np.clip(np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
    else:
        grey = np.clip(arr.astype(np.float64) / 257.0, 0, 255)
    grey8 = np.rint(grey).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2)), mode="RGB")


def _unidentified(data: bytes) -> ImageError:
    """Pillow found no allowed format: say whether the bytes are corrupt, another format, or not an image."""
    fmt = sniff_format(data)
    if fmt in ALLOWED_FORMATS:
        return ImageError(f"the {fmt} header is corrupt or truncated", code="invalid_image")
    if fmt is not None:
        allowed = ", ".join(sorted(ALLOWED_FORMATS))
        return ImageError(f"image format {fmt} is not accepted (allowed: {allowed})",
                          code="unsupported_image_format")
    return ImageError("the data is not a recognised image", code="not_an_image")


def _classify_decode_error(exc: BaseException) -> ImageError:
    """Map an exception raised while decoding to ``truncated_image`` or ``invalid_image``."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "ended" in text:
        return ImageError("the image data is truncated", code="truncated_image")
    if isinstance(exc, MemoryError):
        return ImageError("the image needs too much memory to decode", code="image_too_large")
    return ImageError("the image data is corrupt", code="invalid_image")
