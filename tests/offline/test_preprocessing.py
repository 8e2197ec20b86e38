"""The model's resize rule equals torchvision.transforms.v2 pixel for pixel, on a real photograph.

The photo is matplotlib's bundled ``grace_hopper.jpg`` (512 x 600, a real JPEG); crops and rotations of it give
landscape, portrait, square and too-small inputs. The images go through :func:`decode_image` (what calibration,
evaluation and serving call) and through torchvision on the same decoded PIL image.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2

from service.ingest.images import decode_image
from service.ingest.preprocessing import Preprocessing
from service.store.model_dir import ModelDirError, ModelSpec

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _variants() -> dict[str, bytes]:
    base = Image.open(PHOTO).convert("RGB")
    crops = {"portrait": base, "landscape": base.rotate(90, expand=True), "square": base.crop((0, 0, 512, 512)),
             "odd": base.crop((3, 7, 300, 250)), "small": base.resize((150, 97), Image.Resampling.BILINEAR)}
    out = {}
    for name, im in crops.items():
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92)
        out[name] = buf.getvalue()
    return out


VARIANTS = _variants()
RULES = [Preprocessing((224, 224), "resize_shorter_center_crop", 256),
         Preprocessing((64, 64), "resize_shorter_center_crop", 73),
         Preprocessing((200, 160), "resize_shorter_center_crop", 180),
         Preprocessing((224, 224)), Preprocessing((32, 48))]


def _torchvision(rule: Preprocessing):
    if rule.mode == "direct":
        return v2.Resize(rule.size)
    return v2.Compose([v2.Resize(rule.shorter), v2.CenterCrop(rule.size)])


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_equals_torchvision_v2_on_a_real_photo(rule, name):
    data = VARIANTS[name]
    ours = decode_image(data, rule)
    with Image.open(io.BytesIO(data)) as im:
        theirs = np.asarray(_torchvision(rule)(im.convert("RGB")))
    assert ours.shape == (*rule.size, 3)
    assert np.array_equal(ours, theirs)


def test_crop_differs_from_direct_resize():
    """The two modes are really different (so a model.json that says crop is not silently resized)."""
    a = decode_image(VARIANTS["portrait"], RULES[0])
    b = decode_image(VARIANTS["portrait"], RULES[3])
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_tensor_path_is_close():
    """torchvision on a uint8 tensor (its own antialias) stays within a few grey levels of the PIL path."""
    import torch

    data = VARIANTS["landscape"]
    ours = decode_image(data, RULES[0]).astype(int)
    with Image.open(io.BytesIO(data)) as im:
        t = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    theirs = _torchvision(RULES[0])(t).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(ours - theirs).mean() < 1.0


def test_model_json_round_trip_and_errors():
    spec = ModelSpec("m", {"family": "cifar_resnet", "depth": 20}, ["a", "b"], input_size=(224, 224),
                     resize={"mode": "resize_shorter_center_crop", "shorter": 256})
    obj = spec.to_json()
    assert obj["input"]["resize"] == {"mode": "resize_shorter_center_crop", "shorter": 256,
                                      "interpolation": "bilinear"}
    assert ModelSpec.from_json(obj).preprocessing == RULES[0]
    old = {k: v for k, v in obj.items()}
    old["input"] = {k: v for k, v in obj["input"].items() if k != "resize"}
    assert ModelSpec.from_json(old).preprocessing == Preprocessing((224, 224))  # older model.json: direct
    bad = {**obj, "input": {**obj["input"], "resize": {"mode": "resize_shorter_center_crop"}}}
    with pytest.raises(ModelDirError, match="shorter"):
        ModelSpec.from_json(bad)
    bad = {**obj, "input": {**obj["input"], "resize": {"mode": "zoom"}}}
    with pytest.raises(ModelDirError, match="resize mode"):
        ModelSpec.from_json(bad)
