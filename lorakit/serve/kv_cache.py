"""Paged KV cache: fixed-size blocks in one tensor per layer, a block table per sequence, a free list.

A sequence of n tokens holds ceil(n / block_size) blocks anywhere in the pool; token t of it lives in slot
`table[t // block_size] * block_size + t % block_size`. No per-request contiguous cache, no padding to the
longest sequence. The pool tensors are allocated once, lazily touched: pages the OS never gave out cost nothing.
"""
from __future__ import annotations

import torch


class BlockPool:
    """Free list of block ids and the block table of each sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def extra_blocks(self, seq: str, tokens: int) -> int:
        """Blocks `seq` still needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq, ())))

    def grow(self, seq: str, tokens: int) -> None:
        """Give `seq` enough blocks for `tokens` tokens (the caller checked `extra_blocks` fits)."""
        table = self.tables.setdefault(seq, [])
        need = self.blocks_for(tokens) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {seq} needs {need} blocks, {len(self._free)} free")
        table.extend(self._free.pop() for _ in range(need))

    def free(self, seq: str) -> None:
        self._free.extend(reversed(self.tables.pop(seq, [])))

    def slots(self, seq: str, start: int, stop: int) -> torch.Tensor:
        """Flat slot index of tokens [start, stop) of `seq`."""
        table = torch.tensor(self.tables[seq], dtype=torch.long)
        pos = torch.arange(start, stop)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


class KVCache:
    """K and V of every layer: (num_blocks · block_size, kv_heads, head_dim) per layer, addressed by flat slot."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        self.pool = BlockPool(num_blocks, block_size)
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.block_bytes = 2 * layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (any float dtype; cast to the cache's) at `slots`."""
        self.k[layer].index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v[layer].dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)
