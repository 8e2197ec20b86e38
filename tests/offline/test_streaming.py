"""A streamed ImageFolder is the eagerly read one, image for image, and calibrates to the same bundle."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from service.cli.main import main
from service.ingest.archives import read_image_folder_dir
from service.ingest.labelled import DatasetError
from service.ingest.preprocessing import Preprocessing
from service.ingest.streaming import LazyImages, stream_image_folder_dir
from service.store.bundles import list_bundle_ids
from tests.factories import CLASSES, make_tiny_model, synthetic_images


def _folder(root, n=120, seed=0, top="data"):
    data = synthetic_images(n, seed=seed, size=40)
    for i, (img, lab) in enumerate(zip(data.images, data.labels, strict=True)):
        d = root / top / data.classes[int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img).resize((40 + i % 7, 36 + i % 5))  # assorted sizes: the resize rule matters
        im.save(d / (f"Img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"))
    (root / top / CLASSES[0] / ".DS_Store").write_bytes(b"junk")
    return root / top


@pytest.mark.parametrize("prep", [Preprocessing((32, 32)), Preprocessing((32, 32), "resize_shorter_center_crop", 36)])
def test_stream_equals_eager(tmp_path, prep):
    root = _folder(tmp_path)
    eager = read_image_folder_dir(root, prep)
    lazy = stream_image_folder_dir(root, prep)
    assert isinstance(lazy.images, LazyImages)
    assert lazy.classes == eager.classes and np.array_equal(lazy.labels, eager.labels)
    assert len(lazy) == len(eager) == 120 and lazy.images.shape == eager.images.shape
    assert np.array_equal(lazy.images[0:len(lazy)], eager.images)
    (m1, s1), (m2, s2) = lazy.split_holdout(30, seed=2), eager.split_holdout(30, seed=2)
    assert np.array_equal(m1.images[0:len(m1)], m2.images) and np.array_equal(s1.labels, s2.labels)


def test_a_slice_decodes_only_its_files():
    calls = []

    def reader(i):
        def read():
            calls.append(i)
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format="PNG")
            return buf.getvalue()
        return read

    imgs = LazyImages([reader(i) for i in range(100)], [str(i) for i in range(100)], Preprocessing((4, 4)), 10**6)
    batch = imgs[10:14]
    assert calls == [10, 11, 12, 13] and batch.shape == (4, 4, 4, 3) and batch[2, 0, 0, 0] == 12
    sub = imgs[np.array([50, 3])]
    assert calls == [10, 11, 12, 13] and len(sub) == 2  # a subset decodes nothing
    assert sub[0:2][1, 0, 0, 0] == 3


def test_a_bad_file_is_named_when_its_batch_is_read(tmp_path):
    root = _folder(tmp_path, n=30)
    (root / CLASSES[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lazy = stream_image_folder_dir(root, (32, 32))
    with pytest.raises(DatasetError, match=r"broken\.png"):
        lazy.images[0:len(lazy)]


def test_calibrate_stream_writes_the_eager_bundle(tmp_path, capsys):
    root = _folder(tmp_path, n=200, seed=4)
    dirs = []
    for name in ("eager", "stream"):
        model_dir = tmp_path / name / "tiny"
        make_tiny_model(model_dir)
        args = ["calibrate", "--model-dir", str(model_dir), "--data", str(root), "--holdout", "60", "--search",
                "quantile", "--samples", "200", "--reduction", "pool4", "--batch-size", "50"]
        assert main([*args, "--stream"] if name == "stream" else args) == 0
        capsys.readouterr()
        dirs.append(model_dir / "bundles" / list_bundle_ids(model_dir)[0])
    a, b = (load_file(str(d / "tensors.safetensors")) for d in dirs)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((dirs[0] / "profiles.json").read_text()) == json.loads((dirs[1] / "profiles.json").read_text())
