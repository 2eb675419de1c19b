"""Engine limits, named as vLLM names them where vLLM has the knob."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError

GiB = 1 << 30


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
    - `lora_kernel`: "auto" (segments for multi-token rows and few adapters, rank-bucketed bmm for decode with at
      least `bmm_min_adapters` adapters of one rank), or "segment" / "bmm" everywhere.
    - `load_workers`: threads reading adapter files from disk; 0 reads them on the engine's thread (a schedule that
      does not depend on timing: tests, benchmarks).
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

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "lora_kernel":
                if value not in ("auto", "segment", "bmm"):
                    raise ConfigError(f"lora_kernel must be 'auto', 'segment' or 'bmm', got {value!r}")
            elif (f.name == "max_cpu_loras" and value is None) or (f.name == "load_workers" and value == 0):
                continue
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{f.name} must be an integer >= 1, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                              f"every adapter of a step is loaded in RAM")
