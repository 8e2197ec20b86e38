"""The ResNet-152 reproduction's data transfer (bench/paper152.py): lossless, in parts, order kept."""

from __future__ import annotations

import hashlib

import numpy as np

from bench.paper152 import pack_datasets, unpack
from tests.factories import synthetic_images


def test_pack_and_unpack_are_lossless_across_parts(tmp_path):
    train, test = synthetic_images(120, seed=1), synthetic_images(40, seed=2)
    # Noise images compress badly: a small part size forces several parts.
    meta = pack_datasets({"train": train, "test": test}, tmp_path / "parts", part_mib=0.12, workers=1)
    assert len(meta) >= 3 and sum(m["images"] for m in meta) == 160
    data, info = unpack([tmp_path / "parts" / d for d in "abcdefgh"], workers=1)
    for split, original in (("train", train), ("test", test)):
        assert np.array_equal(data[split].images, original.images)
        assert np.array_equal(data[split].labels, original.labels)
        assert info[split]["contiguous"] and info[split]["index_range"] == [0, len(original)]
        assert info[split]["sha256_images"] == hashlib.sha256(original.images.tobytes()).hexdigest()


def test_a_lost_part_leaves_what_arrived(tmp_path):
    train, test = synthetic_images(120, seed=1), synthetic_images(40, seed=2)
    pack_datasets({"train": train, "test": test}, tmp_path / "parts", part_mib=0.12, workers=1)
    data, info = unpack([tmp_path / "parts" / d for d in "bcdefgh"], workers=1)  # part a never arrived
    lo, hi = info["train"]["index_range"]
    assert lo > 0 and hi == 120 and np.array_equal(data["train"].images, train.images[lo:hi])
    assert np.array_equal(data["test"].images, test.images)
