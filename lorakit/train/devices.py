"""Where and in which precision a run computes: `--device auto|cpu|cuda|cuda:N` and `--bf16` / `--fp16`.

The base model runs on the device in the chosen dtype; adapter parameters and optimizer state stay fp32 (master
weights) and compute in the base's dtype (`lorakit.layers`). Batches are built on the host and moved once per
micro-batch; nothing on the step's hot path copies back to the host except the logged loss.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the current CUDA device when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}, but this torch build sees no CUDA device "
                              f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def base_dtype(bf16: bool = False, fp16: bool = False) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other entries as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
