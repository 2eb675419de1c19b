"""The few collective operations the trainer needs; a no-op in a single process.

Under `torchrun` (WORLD_SIZE > 1) the process group is created with gloo for CPU tensors, plus NCCL for CUDA
tensors when CUDA is present (the trainer's own counters and a CPU model always go through gloo). The model is
replicated (DDP) or, with `fsdp="full_shard"`, sharded with torch's `fully_shard` (helpers at the end).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


# ---- FSDP (`fsdp="full_shard"` under torchrun) -----------------------------------------------------------------
# torch's `fully_shard` (FSDP2) does the sharding: each decoder block is one FSDP unit (its parameters gathered
# for its forward and backward, then freed), the root holds the rest (embeddings, final norm, heads). Parameters
# become DTensors sharded on dim 0, the frozen base's included. The helpers below gather and re-shard whole
# tensors where the trainer needs them (checkpoints, the best weights, the saved adapter).

def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: those whose class is named in transformers' `_no_split_modules` of the
    model (or of a transformers model inside it), e.g. `LlamaDecoderLayer`; innermost first."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names and m is not model]


def shard_model(model: nn.Module) -> nn.Module:
    """Apply `fully_shard` to each decoder block, then to the root (in place; the model's class becomes an
    `FSDPModule`). A model without `_no_split_modules` is one FSDP unit. Mixed dtypes are fine: a bf16 base and
    fp32 adapters all-gather together and only trainable tensors (all fp32) are reduce-scattered."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    model._is_fsdp_managed_module = True  # transformers' `generate` then steps all ranks together (synced_gpus)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t):
    """The whole tensor of an FSDP shard (a collective: every rank must call it, in the same order); other
    values as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensors(state):
    """`state` (nested dicts and lists, as an optimizer's `state_dict()`) with every shard made whole."""
    if isinstance(state, dict):
        return {k: full_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_tensors(v) for v in state)
    return full_tensor(state)


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` split as the sharded `param` is (this rank's part, no communication); `full` itself otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or isinstance(full, DTensor):
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def lockstep_batches(model: nn.Module, batches: int, procs: Processes) -> int:
    """How many extra (discarded) batches this rank must run so that every rank makes as many forward calls:
    under FSDP each forward gathers parameters from all ranks. 0 without FSDP."""
    if procs.world_size == 1 or not is_sharded(model):
        return 0
    most = torch.tensor([batches])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - batches
