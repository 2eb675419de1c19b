"""Engine limits, named as vLLM names them where vLLM has the knob."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..errors import ConfigError

GiB = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


LORA_KERNELS = ("auto", "fused", "segment", "bmm")


@dataclass
class EngineConfig:
    """Limits of one serving engine.

    - `max_loras`: distinct adapters in one step (the compute working set); requests of other adapters wait.
    - `max_lora_rank`: adapters of a higher rank (any layer) are refused at registration.
    - `max_cpu_loras`: adapters kept loaded in RAM (LRU); None = bounded by bytes only.
    - `memory_bytes`: one budget for KV-cache blocks and loaded adapter weights together (S-LoRA's unified pool):
      a loaded adapter takes room the KV cache could use and vice versa; idle adapters are evicted (LRU) when
      the KV cache needs room, never one a running or admitted request uses.
    - `block_size`: tokens per KV-cache block; `max_num_seqs`: running requests; `max_num_batched_tokens`: tokens
      one step computes (prefill + decode); `max_waiting`: queued requests before new ones get QueueFullError.
    - `lora_kernel`: "auto" (the fused CPU kernels of `lorakit.kernels` when they are built; else segments for
      multi-token rows and few adapters, rank-bucketed bmm for decode with at least `bmm_min_adapters` adapters of
      one rank), or "fused" / "segment" / "bmm" everywhere.
    - `load_workers`: threads reading adapter files from disk; 0 reads them on the engine's thread (a schedule that
      does not depend on timing: tests, benchmarks).
    - `dtype` (vLLM's `--dtype`): "auto" = the checkpoint's dtype (config.json `dtype`/`torch_dtype`, else its
      tensors'; fp32 when it is neither bf16 nor fp16), or "float32" / "bfloat16" / "float16". Weights, KV cache and
      adapters are held in it (adapters are scaled in fp32, then cast).
    - `fp32_max_rows`: with a 16-bit dtype, steps of at most this many rows run through fp32 copies of the weights
      (bf16 GEMMs on CPU are slower than fp32 ones at a few rows; see BENCHMARKS.md). 0 = never (no fp32 copies,
      half the weight memory); ignored for float32.
    - `lora_dtype` (vLLM's `--lora-dtype`): the dtype adapters are held in, "auto" = `dtype`. "bfloat16" on a float32
      model halves adapter RAM (the pool's byte budget counts it so) and the bytes each step streams; the fused
      kernels widen the factors exactly and accumulate in fp32, so the only change is rounding the factors (s·B
      after scaling) once at load. Without the kernels, the eager path converts to fp32 and keeps those copies.
    """

    max_loras: int = 32
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    memory_bytes: int = 4 * GiB
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    lora_kernel: str = "auto"
    bmm_min_adapters: int = 4
    load_workers: int = 2
    dtype: str = "auto"
    fp32_max_rows: int = 4
    lora_dtype: str = "auto"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "lora_kernel":
                if value not in LORA_KERNELS:
                    raise ConfigError(f"lora_kernel must be one of {list(LORA_KERNELS)}, got {value!r}")
            elif f.name in ("dtype", "lora_dtype"):
                if value != "auto" and value not in DTYPES:
                    raise ConfigError(f"{f.name} must be 'auto' or one of {list(DTYPES)}, got {value!r}")
            elif (f.name == "max_cpu_loras" and value is None) or (f.name in ("load_workers", "fp32_max_rows")
                                                                   and value == 0):
                continue
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{f.name} must be an integer >= 1, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                              f"every adapter of a step is loaded in RAM")


def serving_dtype(setting: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a model is served in: `setting` ("auto" or a DTYPES name) given the checkpoint's dtype."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {setting!r}")
        return DTYPES[setting]
    return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.float32
