"""Batched forward passes that expose every exit's feature (model in eval mode, inference mode)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from service.backbones import StagedNetwork
from service.backbones.preprocess import Normalizer

ProgressFn = Callable[[int, int], None]


def iter_exit_features(net: StagedNetwork, images: np.ndarray, labels: np.ndarray, norm: Normalizer,
                       batch_size: int = 250, progress: ProgressFn | None = None
                       ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Yield ``(stage features, logits (B, K), labels (B,))`` per batch; un-augmented images.

    The forward pass runs where the network's parameters are (a GPU when it was moved there); the
    features and logits come back as float32 CPU tensors, where the class-mean statistics live.
    """
    for _lo, feats, logits, labs in iter_shard_features(net, images, labels, norm, batch_size, progress=progress):
        yield feats, logits, labs


@torch.inference_mode()
def iter_shard_features(net: StagedNetwork, images: np.ndarray, labels: np.ndarray, norm: Normalizer,
                        batch_size: int = 250, rank: int = 0, world: int = 1, progress: ProgressFn | None = None
                        ) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Like :func:`iter_exit_features` over this process's share: batches ``rank, rank + world, ...`` of the
    one-process batching (so every batch, and every float32 batch sum, is the one a single process computes),
    each with ``lo``, the index of its first sample."""
    net.eval()
    device = net.device
    n = images.shape[0]
    for b, lo in enumerate(range(0, n, batch_size)):
        if b % world != rank:
            continue
        feats, logits = net.forward_all(norm(images[lo:lo + batch_size], device))
        if device.type != "cpu":
            feats = [f.float().cpu() for f in feats]
            logits = logits.float().cpu()
        yield lo, feats, logits, torch.from_numpy(np.ascontiguousarray(labels[lo:lo + batch_size]))
        if progress is not None:
            progress(min(n, lo + batch_size), n)


@torch.inference_mode()
def plain_forward_seconds(net: StagedNetwork, images: np.ndarray, norm: Normalizer, batch_size: int = 250
                          ) -> float:
    """Wall time of the untouched network's forward over ``images`` (the reference for throughput)."""
    import time

    net.eval()
    device = net.device
    t0 = time.perf_counter()
    for lo in range(0, images.shape[0], batch_size):
        net.module(norm(images[lo:lo + batch_size], device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
