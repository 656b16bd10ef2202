"""Several processes under `torchrun`: which one this is, and the few collective steps samcache needs.

torchrun (torch.distributed.run) starts one process per GPU (or per CPU slot) and gives each
RANK, WORLD_SIZE and LOCAL_RANK in its environment, plus a rendezvous address. samcache joins
the process group that describes; without those variables it runs as a group of one, and every
method here is a no-op. One process group serves both backends: CPU tensors (samcache's own
counters) travel over gloo, CUDA tensors (DistributedDataParallel's gradients) over NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks wait for each other at the end of a stage; an unlucky split of a large data set can
# leave one rank an image batch behind the others, far less than this.
_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group.

    Arguments:
      rank: 0..world_size-1 over all nodes; rank 0 writes logs, checkpoints and summaries.
      world_size: number of processes.
      local_rank: index on this node: the GPU this process uses.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Waits until every rank reaches this point."""
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (in float64, so counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def device(self, device: torch.device) -> torch.device:
        """This rank's own GPU when `device` is CUDA (cuda:LOCAL_RANK); the CPU stays the CPU."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}" if self.enabled else ""


SINGLE = Distributed()


def from_environment() -> Distributed:
    """Joins torchrun's process group when this process was started by torchrun; else SINGLE.

    Safe to call more than once (the group is created once per process).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown() -> None:
    """Leaves the process group (torchrun expects every rank to end cleanly)."""
    if dist.is_initialized():
        dist.destroy_process_group()
