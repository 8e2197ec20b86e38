"""The IC feature cache: one frozen-backbone pass stores what exit heads read (pooled maps, logits,
class-means scores), so ICs train and decision tables are built without running the backbone again.
Arrays live in memory, or as ``.npy`` memory maps in a directory (reopened when the key matches)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.backbones import StagedNetwork
from service.backbones.internal_classifiers import pool_pair, pooling_kernel
from service.backbones.preprocess import Normalizer
from service.earlyexit import ExitHead


@dataclass
class FeatureCache:
    """Per image, what the exit heads read, computed once with the backbone in eval mode.

    ``pooled_max[i]``, ``pooled_avg[i]``: ``(N, D_i)`` flattened SDN-pooled maps at IC exit ``exits[i]``
    (``D_i = C * 4 * 4``; equal when no pooling applies). ``logits (N, K)`` float32: the network's own.
    ``labels (N,)`` int64. ``cm_top``, ``cm_pred`` ``(N, E)``: class-means top probability and nearest
    mean at each IC exit (absent without heads); ``cm_all_top``, ``cm_all_pred`` ``(N, M - 1)``: the same at
    every early exit of the backbone (0 where there is no head). ``maps[j]``: full ``(N, C, H, W)`` stage-``j`` outputs
    (for conv branches). Arrays are numpy (memory, or ``.npy`` memory maps when a directory is given).
    ``views``: 1, or 2 when the second half holds horizontally flipped copies of the first.
    """

    exits: tuple[int, ...]
    pooled_max: list[np.ndarray]
    pooled_avg: list[np.ndarray]
    logits: np.ndarray
    labels: np.ndarray
    cm_top: np.ndarray | None = None
    cm_pred: np.ndarray | None = None
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    views: int = 1
    cm_all_top: np.ndarray | None = None
    cm_all_pred: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _alloc(out_dir: Path | None, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    if out_dir is None:
        return np.empty(shape, dtype=dtype)
    return np.lib.format.open_memmap(out_dir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def _open(out_dir: Path, name: str) -> np.ndarray:
    # Copy-on-write: readers may wrap it in a tensor; the file itself is never modified.
    return np.load(out_dir / f"{name}.npy", mmap_mode="c", allow_pickle=False)


def cache_key(spec_sha: str, images: np.ndarray, exits: Sequence[int], map_exits: Sequence[int],
              bundle_id: str | None, dtype: str, flip: bool, map_grid: int | None = None) -> str:
    """Identifies a cache: backbone weights, images (their sha256), exits, bundle, dtype, views."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).data)
    return hashlib.sha256(json.dumps([spec_sha, h.hexdigest(), list(exits), list(map_exits), bundle_id, dtype,
                                      flip, map_grid, 2]).encode()).hexdigest()[:20]


@torch.inference_mode()
def extract_cache(net: StagedNetwork, images: np.ndarray, labels: np.ndarray, norm: Normalizer,
                  exits: Sequence[int], cm_heads: dict[int, ExitHead] | None = None,
                  map_exits: Sequence[int] = (), batch_size: int = 250, dtype: np.dtype | type = np.float32,
                  flip_views: bool = False, progress: Callable[[int, int], None] | None = None,
                  out_dir: Path | None = None, key: str | None = None, map_grid: int | None = None) -> FeatureCache:
    """One pass (two with ``flip_views``) of the frozen backbone over ``images`` ``(N, H, W, 3)`` uint8.

    ``map_exits``: stage outputs kept whole (float16), max-pooled to ``map_grid x map_grid`` when given.

    With ``out_dir`` and ``key``: a finished cache with the same key there is reopened (memory-mapped)
    instead of recomputed; a new one is written there as ``.npy`` files plus ``meta.json`` (last).
    """
    exits = tuple(int(e) for e in exits)
    map_exits = tuple(int(e) for e in map_exits)
    if out_dir is not None:
        out_dir = Path(out_dir)
        meta_path = out_dir / "meta.json"
        if key is not None and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and meta.get("complete"):
                return reopen_cache(out_dir, meta)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
    net.eval()
    n0 = images.shape[0]
    views = 2 if flip_views else 1
    feats = net.run_stages(norm(images[:1]))
    shapes = [tuple(f.shape[1:]) for f in feats]
    k = int(net.head(feats[-1]).shape[1])
    map_k = {j: (shapes[j][1] // map_grid if map_grid and shapes[j][1] > map_grid else 1) for j in map_exits}
    cache = _allocate(out_dir, n0 * views, views, exits, shapes, k, map_k, dtype, cm_heads is not None)
    done = 0
    for v in range(views):
        for lo in range(0, n0, batch_size):
            hi = min(n0, lo + batch_size)
            x = norm(images[lo:hi])
            _fill(cache, net, x.flip(3) if v == 1 else x, slice(v * n0 + lo, v * n0 + hi), shapes, map_k, cm_heads,
                  dtype)
            cache.labels[v * n0 + lo:v * n0 + hi] = labels[lo:hi]
            done += hi - lo
            if progress is not None:
                progress(done, n0 * views)
    if out_dir is not None:
        _flush(cache, out_dir, key, map_exits)
    return cache


def _allocate(out_dir: Path | None, n: int, views: int, exits: tuple[int, ...], shapes: list[tuple[int, ...]],
              k: int, map_k: dict[int, int], dtype: np.dtype | type, has_cm: bool) -> FeatureCache:
    """An empty cache for ``n`` rows (in memory, or ``.npy`` memory maps under ``out_dir``)."""
    dims = []
    for e in exits:
        kern = pooling_kernel(shapes[e])
        c, h, w = shapes[e]
        dims.append(c * (h // kern) * (w // kern))

    def cm(name: str, cols: int, kind: type) -> np.ndarray | None:
        return _alloc(out_dir, name, (n, cols), kind) if has_cm else None

    maps = {j: _alloc(out_dir, f"map{j}", (n, shapes[j][0], shapes[j][1] // m, shapes[j][2] // m), np.float16)
            for j, m in map_k.items()}
    return FeatureCache(exits, [_alloc(out_dir, f"max{i}", (n, d), dtype) for i, d in enumerate(dims)],
                        [_alloc(out_dir, f"avg{i}", (n, d), dtype) for i, d in enumerate(dims)],
                        _alloc(out_dir, "logits", (n, k), np.float32), _alloc(out_dir, "labels", (n,), np.int64),
                        cm("cm_top", len(exits), np.float32), cm("cm_pred", len(exits), np.int64), maps, views,
                        cm("cm_all_top", len(shapes), np.float32), cm("cm_all_pred", len(shapes), np.int64))


def _fill(cache: FeatureCache, net: StagedNetwork, x: torch.Tensor, rows: slice, shapes: list[tuple[int, ...]],
          map_k: dict[int, int], cm_heads: dict[int, ExitHead] | None, dtype: np.dtype | type) -> None:
    """Run every stage on ``x`` (the network's own logits are needed too) and store what the cache keeps."""
    f = x
    for j, stage in enumerate(net.stages):
        f = stage(f)
        if j in cache.maps:
            fm = F.max_pool2d(f, map_k[j]) if map_k[j] > 1 else f
            cache.maps[j][rows] = fm.to(torch.float16).numpy()
        if cm_heads is not None:
            assert cache.cm_all_top is not None and cache.cm_all_pred is not None
            head = cm_heads.get(j)
            if head is None:
                cache.cm_all_top[rows, j], cache.cm_all_pred[rows, j] = 0.0, 0
            else:
                c_, p_ = head.probabilities(f).max(1)
                cache.cm_all_top[rows, j], cache.cm_all_pred[rows, j] = c_.numpy(), p_.numpy()
        if j in cache.exits:
            i = cache.exits.index(j)
            mx, av = pool_pair(f, pooling_kernel(shapes[j]))
            cache.pooled_max[i][rows] = torch.flatten(mx, 1).numpy().astype(dtype, copy=False)
            cache.pooled_avg[i][rows] = torch.flatten(av, 1).numpy().astype(dtype, copy=False)
            if cm_heads is not None:
                assert cache.cm_top is not None and cache.cm_pred is not None
                assert cache.cm_all_top is not None and cache.cm_all_pred is not None
                cache.cm_top[rows, i], cache.cm_pred[rows, i] = cache.cm_all_top[rows, j], cache.cm_all_pred[rows, j]
    cache.logits[rows] = net.head(f).float().numpy()


def _flush(cache: FeatureCache, out_dir: Path, key: str | None, map_exits: tuple[int, ...]) -> None:
    """Flush the memory maps, then write ``meta.json`` last (its presence marks the cache complete)."""
    extra = (cache.cm_top, cache.cm_pred, cache.cm_all_top, cache.cm_all_pred)
    for arr in [*cache.pooled_max, *cache.pooled_avg, cache.logits, cache.labels, *cache.maps.values(),
                *(a for a in extra if a is not None)]:
        if isinstance(arr, np.memmap):
            arr.flush()
    meta = {"key": key, "complete": True, "exits": list(cache.exits), "map_exits": list(map_exits),
            "views": cache.views, "num_pooled": len(cache.exits), "cm": cache.cm_top is not None}
    (out_dir / "meta.json").write_text(json.dumps(meta) + "\n")


def reopen_cache(out_dir: Path, meta: dict[str, Any]) -> FeatureCache:
    e = int(meta["num_pooled"])
    cm = bool(meta["cm"])
    return FeatureCache(tuple(int(v) for v in meta["exits"]), [_open(out_dir, f"max{i}") for i in range(e)],
                        [_open(out_dir, f"avg{i}") for i in range(e)], _open(out_dir, "logits"),
                        _open(out_dir, "labels"), _open(out_dir, "cm_top") if cm else None,
                        _open(out_dir, "cm_pred") if cm else None,
                        {int(j): _open(out_dir, f"map{j}") for j in meta["map_exits"]}, int(meta["views"]),
                        _open(out_dir, "cm_all_top") if cm else None, _open(out_dir, "cm_all_pred") if cm else None)
