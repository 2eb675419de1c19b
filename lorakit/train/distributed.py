"""The few collective operations the trainer needs; a no-op in a single process.

Under `torchrun` (WORLD_SIZE > 1) the process group is created with gloo for CPU tensors, plus NCCL for CUDA
tensors when CUDA is present (the trainer's own counters and a CPU model always go through gloo).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def mean(self, value: float) -> float:
        return self.sum(torch.tensor([value], dtype=torch.float64)).item() / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
