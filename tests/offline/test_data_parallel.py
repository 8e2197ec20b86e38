"""Data-parallel calibration: 2 processes (gloo, 127.0.0.1) write the bundle one process writes.

Each worker runs the CLI exactly as ``torchrun --nproc-per-node 2 -m service.cli.main calibrate ...`` would
(torchrun only sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT); one torch thread per process so
every batch's float32 arithmetic is the one-process arithmetic, and the float64 sums differ at most by their
summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import numpy as np
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from service.cli.main import main
from service.store.bundles import list_bundle_ids
from tests.factories import make_tiny_model, synthetic_images


def _worker(rank: int, world: int, port: int, args: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"rank {rank}: calibrate returned {rc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bundle(model_dir):
    (bid,) = list_bundle_ids(model_dir)
    path = model_dir / "bundles" / bid
    return (load_file(str(path / "tensors.safetensors")), json.loads((path / "profiles.json").read_text()),
            json.loads((path / "bundle.json").read_text()))


def test_two_processes_write_the_one_process_bundle(tmp_path):
    one = tmp_path / "one" / "tiny"
    make_tiny_model(one)
    two = tmp_path / "two" / "tiny"
    shutil.copytree(one, two)
    data = synthetic_images(330, seed=3)  # 330 = 6 full batches of 50 and a partial one: uneven shares
    npz = tmp_path / "d.npz"
    np.savez(npz, images=data.images, labels=data.labels, classes=np.array(data.classes))
    common = ["--data", str(npz), "--holdout", "90", "--search", "paper", "--samples", "500",
              "--reduction", "pool2", "--metric", "diag", "--batch-size", "50"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["calibrate", "--model-dir", str(one), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), ["calibrate", "--model-dir", str(two), *common]), nprocs=2,
             join=True)

    t1, p1, m1 = _bundle(one)
    t2, p2, m2 = _bundle(two)
    assert sorted(t1) == sorted(t2) and len(t1) >= 20
    for key in t1:  # float32 tensors from float64 sums: equal up to the last float32 bit
        assert torch.allclose(t1[key], t2[key], rtol=1e-6, atol=1e-7), key
    assert p1 == p2  # the same thresholds, FLOPs and selection accuracies: the same profiles
    assert m1["config"]["num_means"] == m2["config"]["num_means"] == 240
    assert m1["estimate"] == m2["estimate"]
    assert (m1["calibration_processes"], m2["calibration_processes"]) == (1, 2)
    exact = sum(torch.equal(t1[k], t2[k]) for k in t1)
    print(f"{exact} of {len(t1)} bundle tensors bitwise equal")
