"""Many low-rank adapters on one Linear in few calls (inference, mixed batches): fused kernels, else two `bmm` calls.

With the compiled CPU kernels (`lorakit.kernels`), every adapter whose ΔW is s·B·A runs in one shrink and one
expand call per layer, on the rows of the layer input where they lie (no gather, no scatter, any rank and number
of rows per adapter). Otherwise:

When consecutive adapters in a routing plan have the same rank, dtype and number of rows, their
factors are stacked — A as (k, r, in), s·Bᵀ as (k, r, out) — and the k segments run as
bmm(X, Aᵀ) then bmm(H, s·Bᵀ): each adapter still at its own rank on its own rows, but two calls
instead of 2k, which removes the per-call floor that dominates at many adapters. Stacks are cached
per layer (a few entries) and rebuilt when any factor tensor or scale changes.
"""
from __future__ import annotations

import itertools
import operator
from typing import NamedTuple

import torch
from torch import nn

from . import kernels

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
        self._fused: dict[tuple, tuple] = {}  # (id(variant), pairs) → (variant, state, Aᵀ padded, (s·B)ᵀ)
        self._lists: dict[tuple, tuple] = {}  # (id(plan), pairs) → (plan, _Checks, fused_lists result)
        self._packed: dict[tuple, tuple] = {}  # (id(plan), pairs) → (plan, layers' lists, `packed` result)

    def clear(self) -> None:
        self._cache.clear()
        self._fused.clear()
        self._lists.clear()
        self._packed.clear()

    def packed(self, plan, pairs: bool, lists: list[tuple]) -> tuple[list, list[list[int]]]:
        """One shrink for several layers fed the same input: per plan segment, their Aᵀ side by side (None where
        none has a kernel adapter), and per layer, where its ranks start in each segment. `lists`: each layer's
        `fused_lists` for `plan`, this layer's first; kept while those are the same objects (unchanged factors)."""
        if len(lists) == 1:
            return lists[0][0], [[0] * len(lists[0][0])]
        hit = self._packed.get((id(plan), pairs))
        if hit is not None and hit[0] is plan and len(hit[1]) == len(lists) and all(map(operator.is_, hit[1], lists)):
            return hit[2]
        down, offsets = [], [[0] * len(plan.segments) for _ in lists]
        for s in range(len(plan.segments)):
            parts, width = [], 0
            for i, (at, _, _) in enumerate(lists):
                if at[s] is not None:
                    offsets[i][s] = width
                    width += at[s].shape[1]
                    parts.append(at[s])
            down.append(None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        if len(self._packed) >= MAX_CACHED_STACKS:
            self._packed.pop(next(iter(self._packed)))
        self._packed[id(plan), pairs] = (plan, list(lists), (down, offsets))  # keeps the plan alive: ids not reused
        return down, offsets

    def fused(self, v, pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Aᵀ, (s·B)ᵀ) of variant `v` for the fused kernels (see `lorakit.kernels`; `pairs`: their bf16 layout),
        None if ΔW is not s·B·A."""
        hit, plain = self._fused.get((id(v), pairs)), _plain_lora(v)
        if hit is not None and hit[0] is not v:
            hit = None
        if plain:  # cheap check: the same two parameters at the same versions and scale
            state = _lora_state(v)
            if hit is not None and _same_state(hit[1], state):
                return hit[2], hit[3]
        factors = v.factors()
        if factors is None:
            return None
        a, b, s = factors
        if not plain:
            state = (a.shape, a._version, a.data_ptr(), b.shape, b._version, b.data_ptr(), s, _state_stamp(v))
            if hit is not None and hit[1] == state:
                return hit[2], hit[3]
        # the entry keeps its variant and parameters alive, so a matching id is the same object
        hit = self._fused[id(v), pairs] = (v, state, kernels.down_factor(a, pairs), kernels.up_factor(b, s, pairs))
        return hit[2], hit[3]

    def fused_lists(self, plan, segments, pairs: bool = False) -> tuple[list, list, list]:
        """For the fused kernels, per segment of `plan`: Aᵀ and (s·B)ᵀ (None where this layer runs no kernel), and the
        `segments` left for the eager path. Kept per plan (plans outlive route() blocks with the same names) and
        re-checked at each call (`_Checks`)."""
        variants = list(map(_FIRST, segments))
        hit = self._lists.get((id(plan), pairs))
        if hit is not None and hit[0] is plan and hit[1].hold(self, variants):
            return hit[2]
        ready, plain, others = {}, [], []
        for v, start, _ in segments:
            if v.training and isinstance(v.dropout, nn.Dropout):
                continue
            factors = self.fused(v, pairs)
            if factors is not None:
                ready[start] = factors
                if _plain_lora(v):
                    plain.append(v)
                else:
                    others.append((v, pairs, factors))
        lists = ([ready[a][0] if a in ready else None for _, a, _ in plan.segments],
                 [ready[a][1] if a in ready else None for _, a, _ in plan.segments],
                 [seg for seg in segments if seg[1] not in ready])
        if len(self._lists) >= MAX_CACHED_STACKS:
            self._lists.pop(next(iter(self._lists)))
        # keeps the plan alive: ids are not reused
        self._lists[id(plan), pairs] = (plan, _Checks.of(variants, plain, others), lists)
        return lists

    def unchanged(self, v, pairs: bool, factors: tuple) -> bool:
        """Variant `v`'s kernel factors are still `factors` (recomputed only when its stamp changed: new tensors)."""
        now = self.fused(v, pairs)
        return now is not None and now[0] is factors[0] and now[1] is factors[1]

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


def _lora_state(v) -> tuple:
    """A plain LoRA's two parameters, their versions and its scale."""
    a, b = v._parameters["lora_A"], v._parameters["lora_B"]
    return a, b, a._version, b._version, v.scale


_FIRST, _TRAINING, _VERSION = operator.itemgetter(0), operator.attrgetter("training"), operator.attrgetter("_version")
_SCALE, _PARAMETERS = operator.attrgetter("scale"), operator.attrgetter("_parameters")


def _parameters_named(variants, name: str):
    return map(operator.getitem, map(_PARAMETERS, variants), itertools.repeat(name))


class _Checks(NamedTuple):
    """What a cached `fused_lists` result rests on, checked at every call in a few C-level passes (a mixed batch
    checks every adapter it routes, in every layer): each variant's training mode the same; each plain LoRA's two
    parameters the same objects at the same versions, and its scale the same; other variants by `fused`'s stamp."""
    variants: list
    training: list         # each variant's mode (training with dropout keeps it off the kernels)
    plain: list
    a: list
    b: list
    versions: list
    scales: list
    others: list           # (variant, pairs, factors)

    @classmethod
    def of(cls, variants, plain, others) -> "_Checks":
        a, b = list(_parameters_named(plain, "lora_A")), list(_parameters_named(plain, "lora_B"))
        return cls(variants, list(map(_TRAINING, variants)), plain, a, b, list(map(_VERSION, a + b)),
                   list(map(_SCALE, plain)), others)

    def hold(self, stacks: Stacks, variants: list) -> bool:
        """The result still holds for this layer's `variants` now."""
        return (len(variants) == len(self.variants) and all(map(operator.is_, variants, self.variants))
                and list(map(_TRAINING, variants)) == self.training
                and all(map(operator.is_, _parameters_named(self.plain, "lora_A"), self.a))
                and all(map(operator.is_, _parameters_named(self.plain, "lora_B"), self.b))
                and list(map(_VERSION, self.a + self.b)) == self.versions
                and list(map(_SCALE, self.plain)) == self.scales
                and all(stacks.unchanged(*other) for other in self.others))


def _same_state(old: tuple, new: tuple) -> bool:
    return old[0] is new[0] and old[1] is new[1] and old[2:] == new[2:]


def _plain_lora(v) -> bool:
    """ΔW = scale·B·A read straight from (views of) the parameters lora_A and lora_B, whose versions say when they
    change."""
    from .variants.lora import LoRA

    return type(v).factors is LoRA.factors and type(v).matrices is LoRA.matrices


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


class Shrunk(NamedTuple):
    """A layer's fused shrink: h (tokens, Σ ranks) fp32 on the plan's token layout, and the layer's part of it."""
    h: torch.Tensor
    order: torch.Tensor
    bounds: torch.Tensor
    r0: list[int]          # per plan segment: where this layer's ranks start in h's columns
    ups: list              # per plan segment: (s·B)ᵀ in the kernels' layout, or None
    rest: list             # this layer's segments left for the eager path


@torch.no_grad()
def fused_shrink(x: torch.Tensor, plan, down: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x·Aᵀ on each plan segment's tokens (`down`: Aᵀ per segment, None to skip), with the fused kernel;
    returns (h, token order, segment bounds) for `fused_expand_`."""
    order, bounds = plan.token_layout(x.shape[1:-1].numel())
    x2 = x.reshape(-1, x.shape[-1])
    return kernels.sgmv().shrink(x2 if x2.stride(-1) == 1 else x2.contiguous(), order, bounds, down), order, bounds


@torch.no_grad()
def fused_expand_(out: torch.Tensor, x: torch.Tensor, shrunk: Shrunk, segments) -> list:
    """out += h·(s·B)ᵀ on each adapter's rows (the second fused kernel, after `fused_shrink`); returns the segments
    left for the eager path (all of them when `out` is not a (tokens, features) matrix)."""
    if not out.is_contiguous() or x.shape[:-1] != out.shape[:-1]:
        return segments
    kernels.sgmv().expand(out.view(-1, out.shape[-1]), shrunk.order, shrunk.bounds, shrunk.h, shrunk.r0,
                          shrunk.ups, 0)
    return shrunk.rest
