"""Data-parallel training with torch.distributed, as `torchrun --nproc_per_node N train.py ...` starts it.

torchrun starts N copies of the script and tells each who it is through environment variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Every copy holds the whole model, takes its own slice of
each global batch, and DistributedDataParallel averages the gradients across copies during backward, so all
copies take the same optimizer step and stay identical. Started without torchrun, there is one process and
none of this runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Who this process is among the training processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """The process that writes files (checkpoints, logs, grids, the final model) and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list, per_process: int) -> list:
        """This process's contiguous slice of a global micro-batch of world_size * per_process items."""
        return items[self.rank * per_process : (self.rank + 1) * per_process]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all processes (the tensor itself in a single process)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size


def init_distributed(device: str) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or a World of one without torchrun.

    On CUDA each process drives the GPU numbered by its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world_size == 1:
        return World(device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def close_distributed(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
