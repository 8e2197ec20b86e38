"""Data-parallel calibration on torch.distributed, as ``torchrun --nproc-per-node N`` starts it.

Every process runs the same calibration over its share of the batches; the float64 sums and integer counts of
the streaming statistics (:mod:`service.earlyexit.accumulators`) and the per-sample rows of the selection table
(zero where another process owns the row) are summed across processes with ``all_reduce``, so every process ends
with the one-process statistics (up to float64 summation order). Backend: ``gloo`` on CPU, ``nccl`` on GPUs
(tensors are moved to the process's GPU for the reduction and back).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over all processes; returns ``t``."""
        if self.backend == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
            on = t.to(dev)
            dist.all_reduce(on, op=dist.ReduceOp.SUM)
            t.copy_(on.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def sum_int(self, value: int) -> int:
        return int(self.sum_(torch.tensor([value], dtype=torch.int64)).item())


def current() -> DataParallel | None:
    """The running process group as a :class:`DataParallel`, or None when not distributed (or one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def init_from_env(device: str) -> tuple[DataParallel | None, str]:
    """Join the group torchrun describes (``WORLD_SIZE`` > 1 in the environment); returns it and the device this
    process runs on (``cuda:LOCAL_RANK`` when ``device`` names CUDA). Outside torchrun: ``(None, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None, device
    on_gpu = device.startswith("cuda")
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return current(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
