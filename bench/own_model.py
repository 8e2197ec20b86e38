"""Measure "your own model" end to end, and calibration time against a plain forward pass (1 and 2 processes).

A user's checkpoint is simulated from the embedded default's weights, saved the way the widely shared CIFAR
ResNet checkpoints are (``{'state_dict': {'module.conv1.weight': ...}, 'epoch': ...}`` in a ``.th`` file); the user's
data are ImageFolder directories of PNGs cut from CIFAR-10's test split (calibration and evaluation disjoint).
Then the README's four commands run as subprocesses: import, calibrate, evaluate --attach, serve (+ one request).

Scaling: the same calibration, timed inside the process (``summary.seconds``: the forward passes, statistics and
threshold search, not reading the images) with 1 process and with ``torchrun --nproc-per-node 2``, next to a plain
forward pass over the same images, alternated ``--repeats`` times. The CPU is shared: read ratios, not seconds.

Usage: python bench/own_model.py --work /tmp/own_model --calib 2000 --eval 2000 --out bench/results/own_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10" / "test.npz"
DEFAULT = REPO / "model_store" / "cifar10-resnet20"
BIN = Path(sys.executable).parent
CLI = (str(BIN / "python"), "-m", "service.cli.main")  # this checkout's code (cwd = the repository)


def sh(*args: str, env: dict | None = None) -> tuple[dict | None, float]:
    t0 = time.perf_counter()
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = done.stdout.strip()
    start = out.find("{")
    return (json.loads(out[start:]) if start >= 0 else None), wall


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / classes[int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")


def prepare(work: Path, n_cal: int, n_eval: int) -> list[str]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state = load_file(str(DEFAULT / "weights.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 200, "best_prec1": 0.0},
               work / "resnet20.th")
    with np.load(CIFAR, allow_pickle=False) as d:
        images, labels, classes = d["images"], d["labels"], [str(c) for c in d["classes"]]
    write_folder(work / "calib", images[:n_cal], labels[:n_cal], classes)
    write_folder(work / "eval", images[n_cal:n_cal + n_eval], labels[n_cal:n_cal + n_eval], classes)
    return classes


def serve_once(store: Path, model: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CLASSMEANS_ADMIN_TOKEN": "bench-token-0123456789abcdef", "CLASSMEANS_WARMUP": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, "serve", "--store", str(store), "--model", model,
                             "--port", str(port)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        ready = time.perf_counter() - t0
        with urllib.request.urlopen(f"{base}/profiles", timeout=30) as r:
            profiles = json.loads(r.read())
        png = sorted((store.parent / "eval").rglob("*.png"))[0]
        req = urllib.request.Request(f"{base}/classify", data=png.read_bytes(), headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    default = next(p for p in profiles["profiles"] if p["default"])
    return {"ready_seconds": ready, "default_profile": default, "classify": answer}


def plain_forward(model_dir: Path, data: Path, threads: int) -> float:
    code = ("import sys,json,torch;from pathlib import Path;torch.set_num_threads(int(sys.argv[3]));"
            "from service.store.model_dir import load_model;from service.ingest.sources import load_dataset;"
            "from service.backbones.preprocess import Normalizer;"
            "from service.offline.features import plain_forward_seconds;"
            "spec,net=load_model(Path(sys.argv[1]));d=load_dataset(sys.argv[2],image_size=spec.preprocessing);"
            "print(json.dumps({'seconds':plain_forward_seconds(net,d.images,Normalizer(spec.mean,spec.std),250)}))")
    return sh(BIN / "python", "-c", code, model_dir, data, str(threads))[0]["seconds"]


def scaling(model_dir: Path, data: Path, holdout: int, repeats: int) -> dict:
    """Per repeat, side by side: plain forward (1 and 2 threads), calibration in 1 process (1 and 2 threads) and
    in 2 processes of 1 thread (torchrun). ``seconds`` = calibrate() from a common start (a barrier), without
    reading the images; ``wall`` = the whole command (start-up, imports, PNG decoding included)."""
    cal = ["calibrate", "--model-dir", str(model_dir), "--data", str(data), "--holdout", str(holdout),
           "--search", "quantile", "--samples", "2000", "--reduction", "pool4", "--no-activate", "--tag", "scale"]
    rows = []
    for _ in range(repeats):
        row: dict = {"plain_forward_1t_s": plain_forward(model_dir, data, 1),
                     "plain_forward_2t_s": plain_forward(model_dir, data, 2)}
        for key, threads in (("1proc_1t", "1"), ("1proc_2t", "2")):
            summary, wall = sh(*CLI, *cal, env={"OMP_NUM_THREADS": threads})
            row[f"calibrate_{key}_s"], row[f"calibrate_{key}_wall_s"] = summary["seconds"], wall
            row[f"calibrate_{key}_timings"] = summary["timings"]
        summary, wall = sh(BIN / "torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(_port()), "-m", "service.cli.main", *cal, env={"OMP_NUM_THREADS": "1"})
        row["calibrate_2proc_1t_s"], row["calibrate_2proc_1t_wall_s"] = summary["seconds"], wall
        row["calibrate_2proc_1t_timings"] = summary["timings"]
        row["ratio_1proc_1t_vs_forward_1t"] = row["calibrate_1proc_1t_s"] / row["plain_forward_1t_s"]
        row["ratio_1proc_2t_vs_forward_2t"] = row["calibrate_1proc_2t_s"] / row["plain_forward_2t_s"]
        row["ratio_2proc_vs_forward_1t"] = row["calibrate_2proc_1t_s"] / row["plain_forward_1t_s"]
        row["ratio_2proc_vs_forward_2t"] = row["calibrate_2proc_1t_s"] / row["plain_forward_2t_s"]
        rows.append(row)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if not k.endswith("timings")}
    return {"runs": rows, "median": med}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/own_model")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.work)
    classes_dir = work / "calib"
    prepare(work, args.calib, args.eval)
    model_dir = work / "store" / "user-r20"
    steps: dict = {}
    steps["import"], t_imp = sh(*CLI, "import", work / "resnet20.th", "--arch", "resnet20", "--classes", classes_dir,
                                "--normalize", "cifar10", "--out", model_dir, "--trained-on", "train.npz",
                                "--trained-images", "50000")
    steps["calibrate"], t_cal = sh(*CLI, "calibrate", "--model-dir", model_dir, "--data", work / "calib",
                                   "--holdout", str(args.calib // 2), "--search", "quantile", "--samples", "2000",
                                   "--reduction", "pool4")
    steps["evaluate"], t_eval = sh(*CLI, "evaluate", "--model-dir", model_dir, "--data", work / "eval", "--attach")
    served = serve_once(work / "store", "user-r20")
    report = {
        "walls_seconds": {"import": t_imp, "calibrate": t_cal, "evaluate": t_eval,
                          "serve_until_ready": served["ready_seconds"]},
        "calibrate_summary": {k: steps["calibrate"][k] for k in ("seconds", "num_means", "num_selection",
                                                                 "estimate", "bundles")},
        "evaluate": {k: steps["evaluate"][k] for k in ("num_samples", "full_network_accuracy")},
        "served_default_profile": served["default_profile"],
        "classify_response_keys": sorted(served["classify"]),
        "scaling": scaling(model_dir, work / "calib", args.calib // 2, args.repeats),
        "cpu": {"cores": os.cpu_count(), "note": "shared with a niced training job and other engineers"},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
