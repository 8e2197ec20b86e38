"""Geometric preprocessing of a decoded RGB image: the one function calibration, evaluation and serving share.

Two modes, recorded in ``model.json`` under ``input.resize``:

- ``direct``: resize straight to ``size = (H, W)`` (aspect ratio not kept), bilinear. torchvision's
  ``Resize((H, W))``.
- ``resize_shorter_center_crop``: scale so the shorter side is ``shorter`` pixels (the longer side becomes
  ``int(shorter * long / short)``, truncated), bilinear, then cut the centred ``H x W`` window (zero-padded when
  the image is smaller). torchvision's ``Resize(shorter) + CenterCrop((H, W))``, the ImageNet convention
  (``Resize(256) + CenterCrop(224)``).

Both match ``torchvision.transforms.v2`` on PIL images pixel for pixel (tests/offline/test_preprocessing.py):
Pillow's bilinear filter antialiases when downscaling, which is what torchvision calls on a PIL image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

MODES = ("direct", "resize_shorter_center_crop")


@dataclass(frozen=True)
class Preprocessing:
    """``size``: the network's input ``(H, W)``; ``shorter``: the shorter side before the centre crop (crop mode)."""

    size: tuple[int, int]
    mode: str = "direct"
    shorter: int | None = None

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"size must be a positive (height, width), got {self.size!r}")
        if self.mode not in MODES:
            raise ValueError(f"resize mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "resize_shorter_center_crop" and (self.shorter is None or self.shorter <= 0):
            raise ValueError("resize_shorter_center_crop needs a positive 'shorter' side")
        if self.mode == "direct" and self.shorter is not None:
            raise ValueError("'shorter' only applies to resize_shorter_center_crop")

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, **({"shorter": self.shorter} if self.shorter is not None else {}),
                "interpolation": "bilinear"}

    @classmethod
    def from_json(cls, size: tuple[int, int], obj: dict[str, Any] | None) -> Preprocessing:
        obj = obj or {}
        interp = obj.get("interpolation", "bilinear")
        if interp != "bilinear":
            raise ValueError(f"only bilinear interpolation is supported, got {interp!r}")
        shorter = obj.get("shorter")
        return cls(tuple(size), str(obj.get("mode", "direct")), None if shorter is None else int(shorter))

    def describe(self) -> str:
        h, w = self.size
        if self.mode == "direct":
            return f"Resize(({h}, {w}))"
        return f"Resize({self.shorter}) + CenterCrop(({h}, {w}))"

    def apply(self, im: Image.Image) -> Image.Image:
        """Return the ``H x W`` image the network sees (``im`` is RGB; it is not modified)."""
        h, w = self.size
        if self.mode == "direct":
            return im if im.size == (w, h) else im.resize((w, h), Image.Resampling.BILINEAR)
        return center_crop(resize_shorter(im, int(self.shorter or 0)), h, w)


def as_preprocessing(size: tuple[int, int] | Preprocessing) -> Preprocessing:
    """A plain ``(H, W)`` means a direct resize (the behaviour before preprocessing modes existed)."""
    return size if isinstance(size, Preprocessing) else Preprocessing(tuple(size))


def resize_shorter(im: Image.Image, shorter: int) -> Image.Image:
    """Shorter side to ``shorter``, longer side ``int(shorter * long / short)``, bilinear (torchvision's rule)."""
    width, height = im.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return im
    return im.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(im: Image.Image, h: int, w: int) -> Image.Image:
    """The centred ``h x w`` window (top/left offsets rounded half to even, as torchvision); zero padding when
    the image is smaller, split as torchvision splits it (the extra pixel on the right/bottom)."""
    width, height = im.size
    if h > height or w > width:
        left, top = (w - width) // 2 if w > width else 0, (h - height) // 2 if h > height else 0
        padded = Image.new(im.mode, (width + max(0, w - width), height + max(0, h - height)))
        padded.paste(im, (left, top))
        im, (width, height) = padded, padded.size
        if (width, height) == (w, h):
            return im
    top, left = round((height - h) / 2.0), round((width - w) / 2.0)
    return im.crop((left, top, left + w, top + h))
