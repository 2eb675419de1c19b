"""Many low-rank adapters on one Linear in two `bmm` calls (inference, mixed batches).

When consecutive adapters in a routing plan have the same rank, dtype and number of rows, their
factors are stacked — A as (k, r, in), s·Bᵀ as (k, r, out) — and the k segments run as
bmm(X, Aᵀ) then bmm(H, s·Bᵀ): each adapter still at its own rank on its own rows, but two calls
instead of 2k, which removes the per-call floor that dominates at many adapters. Stacks are cached
per layer (a few entries) and rebuilt when any factor tensor or scale changes.
"""
from __future__ import annotations

import torch
from torch import nn

MAX_CACHED_STACKS = 4


def runs(segments, batchable: bool) -> list[list]:
    """Split (variant, start, stop) segments into runs that can share one pair of bmm calls."""
    out, last_key = [], None
    for seg in segments:
        v, a, b = seg
        factors = None if not batchable or (v.training and isinstance(v.dropout, nn.Dropout)) else v.factors()
        key = None if factors is None else (factors[0].shape, factors[0].dtype, b - a)
        if key is not None and key == last_key:
            out[-1].append(seg)
        else:
            out.append([seg])
        last_key = key
    return out


class Stacks:
    """Stacked factors per group of variants, rebuilt when a factor's version, storage or scale changes."""

    def __init__(self):
        self._cache: dict[tuple, tuple] = {}

    def clear(self) -> None:
        self._cache.clear()

    def get(self, variants) -> tuple[torch.Tensor, torch.Tensor]:
        factors = [v.factors() for v in variants]
        key = tuple(id(v) for v in variants)
        stamp = tuple((a._version, a.data_ptr(), b._version, b.data_ptr(), s, _state_stamp(v))
                      for (a, b, s), v in zip(factors, variants))
        hit = self._cache.get(key)
        # the entry keeps its variants alive, so a matching id is the same object, never a reused address
        if hit is None or hit[1] != stamp or any(v is not w for v, w in zip(variants, hit[0])):
            if len(self._cache) >= MAX_CACHED_STACKS:
                self._cache.pop(next(iter(self._cache)))
            a = torch.stack([a for a, _, _ in factors])                    # (k, r, in)
            bt = torch.stack([(b * s).T for _, b, s in factors])          # (k, r, out), scale folded in
            hit = self._cache[key] = (tuple(variants), stamp, a, bt)
        return hit[2], hit[3]


def _state_stamp(variant) -> tuple:
    """Versions and storages of the tensors a variant's factors derive from (its own and its shared state's):
    factors computed on the fly (e.g. R·A, diag(λ)·B) are fresh tensors whose version is always 0 and whose
    address the allocator may hand out again, so their own stamp cannot tell an updated adapter from the old one."""
    owners = [variant] + ([variant.shared] if getattr(variant, "shared", None) is not None else [])
    return tuple((t._version, t.data_ptr()) for o in owners for t in (*o.parameters(), *o.buffers()))


@torch.no_grad()
def add_run_(out: torch.Tensor, xs: torch.Tensor, plan, run, stacks: Stacks) -> None:
    """out[rows of the run] += B_i·s_i·A_i·x for each adapter i of the run, in two bmm calls."""
    a0, a1 = run[0][1], run[-1][2]
    a, bt = stacks.get([v for v, _, _ in run])
    k = len(run)
    x = xs[a0:a1].to(a.dtype).reshape(k, -1, a.shape[-1])
    h = torch.bmm(x, a.transpose(1, 2))                                  # (k, tokens, r)
    target = out[a0:a1] if plan.identity else None
    if target is not None and target.is_contiguous() and target.dtype == bt.dtype:
        target.view(k, -1, bt.shape[-1]).baddbmm_(h, bt)
        return
    y = torch.bmm(h, bt).view(a1 - a0, *out.shape[1:])
    if plan.identity:
        out[a0:a1] += y
    else:
        out.index_add_(0, plan.order[a0:a1], y.to(out.dtype))
