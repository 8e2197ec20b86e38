"""The physical reference: the network called directly from Python, no HTTP, no decoding.

Two things are timed in this process, on the same images as the servers (already decoded):

- plain PyTorch: ``net.module(x)`` (the full network) at batch 1 and at batch 32, in ``inference_mode``;
- the cascade runner (``service.serving.cascade.CascadeRunner``) at each profile of the active bundle, at batch 1
  and 32: the compute the service does per request, without the service around it.

Both use the torch thread count given, the same as the servers get.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.images import ImageSet
from bench.loadgen import latency_summary


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def _time_calls(fn: Any, batches: list[torch.Tensor], warmup: int = 3, passes: int = 3
                ) -> tuple[list[float], list[Any]]:
    """Wall time of each call over the batches; the fastest of ``passes`` passes (other work on the
    machine only ever slows a pass down)."""
    for b in batches[:warmup]:
        fn(b)
    best: list[float] | None = None
    outs: list[Any] = []
    for _ in range(passes):
        times, outs = [], []
        for b in batches:
            t0 = time.perf_counter()
            outs.append(fn(b))
            times.append(time.perf_counter() - t0)
        if best is None or sum(times) < sum(best):
            best = times
    assert best is not None
    return best, outs


def _summary(times: list[float], n_images: int, batch: int) -> dict[str, Any]:
    total = sum(times)
    return {"batch": batch, "images": n_images, "seconds": total, "images_per_second": n_images / total,
            "latency_per_call_seconds": latency_summary(times)}


def _cpu_us(fn: Any, arg: Any, n: int = 100, rounds: int = 3) -> float:
    """Thread CPU time of ``fn(arg)`` in microseconds: the best of ``rounds`` means (robust to other
    processes taking the core away, which wall time is not)."""
    for _ in range(5):
        fn(arg)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(n):
            fn(arg)
        best = min(best, (time.thread_time() - t0) / n)
    return 1e6 * best


@torch.inference_mode()
def batch1_costs(net: Any, bundle: Any, runner: Any, x: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Where batch-1 time goes: CPU time of each stage and of each class-means head at batch 1, and per
    profile the time its exit distribution predicts with heads (as served) and without (their FLOPs are
    negligible, their per-operation overhead is not), against the FLOPs fraction."""
    from service.earlyexit.policy import class_means_policy

    feats = net.run_stages(x[:1])
    inputs = [x[:1], *feats[:-1]]
    stage_us = [_cpu_us(stage, inp) for stage, inp in zip(net.stages, inputs, strict=True)]
    head_us = [(_cpu_us(bundle.heads[j].probabilities, feats[j]) if j in bundle.heads else None)
               for j in range(len(net.stages))]
    final_us = _cpu_us(lambda f: torch.softmax(net.head(f), dim=1), feats[-1])
    cum = []
    acc = 0.0
    for us in stage_us:
        acc += us
        cum.append(acc)
    cum.append(acc + final_us)
    full_us = cum[-1]
    rows = {}
    for name in names:
        if name == "full":
            continue
        t = bundle.profile(name).thresholds
        res = runner.run(x, class_means_policy(name, t, bundle.costs))
        exits = res.exit_index.tolist()
        no_heads = sum(cum[e] for e in exits) / len(exits)
        with_heads = sum(cum[e] + sum(head_us[i] or 0.0 for i in range(min(e, len(t) - 1) + 1) if t[i] < 1)
                         for e in exits) / len(exits)
        frac = float(res.flops.mean()) / bundle.costs.full
        rows[name] = {"flops_fraction": frac, "flops_speedup": 1 / frac,
                      "stage_time_speedup_if_heads_were_free": full_us / no_heads,
                      "predicted_speedup_with_heads": full_us / with_heads,
                      "heads_consulted_mean": sum(sum(1 for i in range(min(e, len(t) - 1) + 1) if t[i] < 1)
                                                  for e in exits) / len(exits)}
    return {"stage_us": stage_us, "head_us": head_us, "final_head_us": final_us, "full_us": full_us,
            "stage_names": list(net.stage_names), "profiles": rows}


def measure(model_dir: Path, images: ImageSet, n_batch1: int, n_batch32: int, threads: int,
            only: list[str] | None = None) -> dict[str, Any]:
    """Plain forward and exit runner timings (``full`` and the profiles in ``only``, default all)."""
    from service.backbones.preprocess import Normalizer
    from service.earlyexit.policy import class_means_policy
    from service.serving.cascade import CascadeRunner
    from service.store.bundle_model import load_bundle
    from service.store.bundles import read_active
    from service.store.model_dir import load_model

    if threads:
        torch.set_num_threads(threads)
    spec, net = load_model(model_dir)
    net.eval()
    x = Normalizer(spec.mean, spec.std)(images.pixels)
    labels = torch.from_numpy(images.labels)
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}

    @torch.inference_mode()
    def forward(b: torch.Tensor) -> torch.Tensor:
        return net.module(b).argmax(dim=1)

    t1, p1 = _time_calls(forward, _batches(x[:n_batch1], 1))
    t32, p32 = _time_calls(forward, _batches(x[:n_batch32], 32))
    pred32 = torch.cat(p32)
    out["plain_batch1"] = {**_summary(t1, n_batch1, 1),
                           "accuracy": float((torch.cat(p1) == labels[:n_batch1]).float().mean())}
    out["plain_batch32"] = {**_summary(t32, n_batch32, 32),
                            "accuracy": float((pred32 == labels[:n_batch32]).float().mean())}

    active = read_active(model_dir) or {}
    bundle = load_bundle(model_dir, str(active["bundle"]), spec, net.num_exits)
    runner = CascadeRunner(net, bundle.heads)
    full = bundle.costs.full
    profiles: dict[str, Any] = {}
    names = ["full", *[p.name for p in bundle.profiles
                       if p.name != "full" and (only is None or p.name in only)]]
    for name in names:
        thr = (torch.ones(net.num_exits - 1) if name == "full" and name not in bundle.profile_names()
               else torch.tensor(bundle.profile(name).thresholds, dtype=torch.float32))
        policy = class_means_policy(name, thr, bundle.costs)
        row: dict[str, Any] = {}
        for batch, n in ((1, n_batch1), (32, n_batch32)):
            times, res = _time_calls(lambda b, p=policy: runner.run(b, p), _batches(x[:n], batch))
            pred = torch.cat([r.pred for r in res])
            flops = torch.cat([r.flops for r in res])
            row[f"batch{batch}"] = {**_summary(times, n, batch),
                                    "accuracy": float((pred == labels[:n]).float().mean()),
                                    "mean_flops_fraction": float(flops.mean()) / full}
        profiles[name] = row
    out["runner"] = {"bundle": bundle.bundle_id, "profiles": profiles, "flops_full": full,
                     "note": "CascadeRunner.run on normalised tensors; 'full' = every exit disabled"}
    out["batch1_costs"] = batch1_costs(net, bundle, runner, x[:n_batch1], names)
    out["images_source"] = images.source
    out["labels_checksum"] = int(np.asarray(images.labels[:max(n_batch1, n_batch32)]).sum())
    return out
