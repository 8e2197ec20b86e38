"""Peak RSS of `classmeans evaluate` over an ImageFolder, read eagerly vs streamed (--stream).

Writes CIFAR-10's 50k training images as PNGs (once), then runs each mode as a subprocess and reads its peak RSS
(``ru_maxrss`` of the finished child). Usage: python bench/stream_rss.py --work /tmp/stream_rss --n 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10" / "train.npz"
MODEL = REPO / "model_store" / "cifar10-resnet20"


def write_folder(root: Path, n: int) -> None:
    if (root.parent / "done").exists():
        return
    with np.load(CIFAR, allow_pickle=False) as d:
        images, labels, classes = d["images"][:n], d["labels"][:n], [str(c) for c in d["classes"]]
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(root / classes[int(lab)] / f"{i:05d}.png", compress_level=1)
    (root.parent / "done").write_text("ok")


def run(mode: str, folder: Path) -> dict:
    args = [sys.executable, "-m", "service.cli.main", "evaluate", "--model-dir", str(MODEL), "--data", str(folder)]
    t0 = time.perf_counter()
    done = subprocess.run([*args, *(["--stream"] if mode == "stream" else [])], cwd=REPO, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    out = json.loads(done.stdout[done.stdout.find("{"):])
    return {"wall_s": wall, "full_network_accuracy": out["full_network_accuracy"], "num_samples": out["num_samples"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/stream_rss")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    folder = Path(args.work) / "train"
    write_folder(folder, args.n)
    report = {}
    for mode in ("stream", "eager"):  # ru_maxrss of children is a running maximum: the smaller one first
        report[mode] = run(mode, folder)
        report[mode]["peak_rss_mib_children_so_far"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
