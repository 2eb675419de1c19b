"""The adapted layer: keeps the original module as `base_layer` and holds any number of named adapters."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .errors import MergeError, RoutingError
from . import kernels, stacked
from .kinds import ConvKind, kind_for


class AdaptedLayer(nn.Module):
    """Wraps one base module; output = base(x) + Σ over active adapters of their deltas.

    Under `lorakit.route(...)`, `routing` is set and each adapter runs only on its own rows,
    at its own rank, on contiguous slices of the (stably sorted) batch.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind_for(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self.merged: dict[str, Optional[torch.Tensor]] = {}  # name → row scale used at merge time
        self.routing = None
        self._stacks = stacked.Stacks()  # stacked factors for batched inference over many adapters
        self._followers: list[AdaptedLayer] = []  # layers fed this layer's input right after it (`_fused_shrink`)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models that read `module.weight`, e.g. its dtype, keep working)."""
        return self.base_layer.weight

    def remove(self, name: str) -> None:
        """Drop adapter `name` (and any stacked copies of its factors)."""
        del self.adapters[name]
        self._stacks.clear()

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x, *args, **kwargs):
        if not self.disabled and self.routing is not None and self.routing.per_row:
            return self._routed(x, lambda: self.base_layer(x, *args, **kwargs))
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.routing is not None and self.routing.mix is not None:
            return self._mixed(x, out)
        variants = [self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged]
        for v in variants:
            _bind(v, self.routing)
        if not variants:
            return out
        if self.merged and any(v.reads_base_weight for v in variants):
            raise MergeError(f"active adapters read the base weight, which has {list(self.merged)} merged into it; "
                             "merge them too, or unmerge first")
        with _compute_in(out.dtype, out.device):
            if torch.is_grad_enabled():
                y = out
                for v in variants:
                    y = v.plus_delta(y, _cast(x, v, out.dtype), out)
                return y.to(out.dtype)
            # inference: add into the base output in place (keeping a copy only if a later adapter reads it)
            base = out.clone() if len(variants) > 1 and any(v.uses_base_out for v in variants) else out
            for v in variants:
                v.add_delta_(out, _cast(x, v, out.dtype), base)
            return out

    def _routed(self, x, base):
        """Each adapter on its own rows. `base()` computes the base layer's output. With the fused kernels, the
        shrink runs first, while x is still in cache from the op that produced it (and, for layers fed the same
        input, once for all of them: see `_fused_shrink`), then the base GEMM, then the expand into its output;
        other variants (and the eager path) gather the routed rows and run on slices."""
        if self.merged:
            raise RoutingError("mixed-batch routing needs unmerged layers; call lorakit.unmerge(model) first")
        plan = self.routing.plan(x.shape[0], x.device)
        segments = self._segments(plan)
        for v, a, b in segments:
            _bind(v, self.routing, plan, a, b, x.shape[0])
        if not segments:
            return base()
        shrunk = self._fused_shrink(x, plan, segments) if self._uses_kernels(x) else None
        out = base()
        if shrunk is not None:
            segments = stacked.fused_expand_(out, x, shrunk, segments)
            if not segments:
                return out
        with _compute_in(out.dtype, out.device):
            return self._routed_deltas(x, out, plan, segments)

    def _segments(self, plan) -> list[tuple]:
        """(variant, start, stop) for each segment of `plan` whose adapter this layer holds."""
        adapters = self.adapters._modules  # the plain dict: with many adapters, ModuleDict lookups add up
        return [(adapters[n], a, b) for n, a, b in plan.segments if n in adapters]

    def _uses_kernels(self, x) -> bool:
        return self.kind.batchable and kernels.uses(x, getattr(self.kind, "out_features", None))

    def _fused_shrink(self, x, plan, segments):
        """The fused shrink for this layer's adapters (see `stacked.fused_shrink`), shared by layers fed the same
        input tensor (q/k/v, gate/up: vLLM's packed modules): x is read once and the kernel runs once for all.

        Which layers share an input is learned from the calls: a layer called with the very tensor (same object,
        same version, same plan) that the previous routed call got becomes that layer's follower. From then on
        the first layer shrinks for its followers too, and each follower takes its columns of h when its own input
        is that tensor again (else it shrinks alone: the result is the same either way, bit for bit)."""
        pairs = x.dtype == torch.bfloat16 and kernels.bf16_dot()
        own = self._stacks.fused_lists(plan, segments, pairs)
        if len(own[2]) == len(segments):
            return None
        last = plan.shared.get(SHRINK)
        version = _version(x)
        if last is not None and last[0] is x and version is not None and last[1] == version and last[2] is not self:
            part = last[3].get(id(self))
            if part is not None and part[1] is own:
                return stacked.Shrunk(*last[4], part[0], own[1], own[2])
            if self not in last[2]._followers:  # learned now, shared from the next pass
                last[2]._followers.append(self)
            return stacked.Shrunk(*stacked.fused_shrink(x, plan, own[0]), [0] * len(own[0]), own[1], own[2])
        members, lists = [self], [own]
        for f in self._followers if version is not None else ():
            if f.routing is self.routing and not f.merged and not f.disabled and f._uses_kernels(x):
                f_segments = f._segments(plan)
                if f_segments and not any(getattr(v, "reads_routing", False) for v, _, _ in f_segments):
                    members.append(f)
                    lists.append(f._stacks.fused_lists(plan, f_segments, pairs))
        down, offsets = self._stacks.packed(plan, pairs, lists)
        shrunk = stacked.fused_shrink(x, plan, down)
        if version is not None:
            parts = {id(m): (r0, m_lists) for m, r0, m_lists in zip(members, offsets, lists)}
            plan.shared[SHRINK] = (x, version, self, parts, shrunk)
        return stacked.Shrunk(*shrunk, offsets[0], own[1], own[2])

    def _mixed(self, x, out):
        """out + Σᵢ wᵢ(token)·deltaᵢ, each adapter on the tokens it weights only (see `lorakit.route(weights=)`)."""
        mix = self.routing.mix
        present = [(i, self.adapters[n]) for i, n in enumerate(mix.names) if n in self.adapters]
        if not present:
            return out
        if self.merged:
            raise RoutingError("routing needs unmerged layers; call lorakit.unmerge(model) first")
        if isinstance(self.kind, ConvKind):
            raise RoutingError("per-token mixing needs layers whose output has features last (linear, embedding); "
                               f"this layer is a {type(self.base_layer).__name__}")
        tokens = out.shape[:-1].numel()
        xt = x.reshape(tokens, *x.shape[out.dim() - 1:])
        ot = out.reshape(tokens, out.shape[-1])
        if getattr(mix.gate, "fuses", False):
            return self._fused(mix, present, xt, ot).view(out.shape)
        plan = mix.plan(self, xt, tokens, torch.float32 if out.dtype in HALF else out.dtype)
        grad = torch.is_grad_enabled()
        reads_base = any(v.uses_base_out for _, v in present)
        base_t = ot.clone() if reads_base and not grad else ot  # in place below: keep the base output apart
        with _compute_in(out.dtype, out.device):
            for i, v in present:
                index = plan.index[i]
                if index is not None and not len(index):
                    continue
                xs = plan.gather(i, x, xt)
                base = None if not v.uses_base_out else base_t if index is None else base_t.index_select(0, index)
                if getattr(v, "reads_routing", False):
                    v.bind_routing(self.routing, index, tokens if index is not None else None)
                d = v.delta(_cast(xs, v, out.dtype), base)
                d = (d if plan.columns[i] is None else d * plan.columns[i]).to(out.dtype)
                if index is None:
                    ot = ot + d if grad else ot.add_(d)
                else:
                    ot = ot.index_add(0, index, d) if grad else ot.index_add_(0, index, d)
        return ot.view(out.shape)

    def _fused(self, mix, present, xt, ot):
        """A fusing gate's output `gate(path, h, deltas)` from the base output h and every adapter's delta on every
        token (None for adapters this layer lacks)."""
        deltas = [None] * len(mix.names)
        with _compute_in(ot.dtype, ot.device):
            for i, v in present:
                if getattr(v, "reads_routing", False):
                    v.bind_routing(self.routing, None, None)
                deltas[i] = v.delta(_cast(xt, v, ot.dtype), ot if v.uses_base_out else None)
            fused = mix.gate(mix.paths.get(id(self), ""), ot, deltas)
        if not isinstance(fused, torch.Tensor) or fused.shape != ot.shape:
            raise RoutingError(f"a fusing gate must return the layer output shaped {tuple(ot.shape)}, got "
                               f"{tuple(fused.shape) if isinstance(fused, torch.Tensor) else type(fused).__name__}")
        return fused.to(ot.dtype)

    def _routed_deltas(self, x, out, plan, segments):
        xs = plan.gather(x)
        needs_base = any(v.uses_base_out for v, _, _ in segments)
        ys = out if plan.identity else out.index_select(0, plan.order) if needs_base else None
        if not torch.is_grad_enabled():  # inference: accumulate into the base output in place
            for run in stacked.runs(segments, self.kind.batchable):
                if len(run) > 1:  # same-rank, same-size low-rank adapters: two bmm calls for all of them
                    stacked.add_run_(out, xs, plan, run, self._stacks)
                    continue
                v, a, b = run[0]
                x_rows, base_rows = _cast(xs[a:b], v, out.dtype), None if ys is None else ys[a:b]
                if plan.identity:
                    v.add_delta_(out[a:b], x_rows, base_rows)
                else:
                    out.index_add_(0, plan.order[a:b], v.delta(x_rows, base_rows).to(out.dtype))
            return out
        deltas = [v.delta(_cast(xs[a:b], v, out.dtype), None if ys is None else ys[a:b]) for v, a, b in segments]
        delta = torch.cat(deltas) if len(deltas) > 1 else deltas[0]
        if plan.identity and len(plan.order) == out.shape[0] and len(segments) == len(plan.segments):
            return (out + delta).to(out.dtype)  # every row routed, already in order: no scatter
        rows = torch.cat([plan.order[a:b] for _, a, b in segments]) if len(segments) < len(plan.segments) \
            else plan.order
        return out.to(delta.dtype).index_add(0, rows, delta).to(out.dtype)

    # ---- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self, names: list[str]) -> tuple[torch.Tensor, dict[str, Optional[torch.Tensor]]]:
        """The (out, in) fp64 weight with exactly `names` folded in, and each one's row scale.

        Effective weight of one adapter: c ⊙ (W + ΔW), c its row scale (1 for LoRA); several merged
        adapters add their changes. Unmerging solves the same relation back for W.
        """
        names = self.check_mergeable(names)
        original = self._unmerged_weight()
        scales = {n: self.merged[n] if n in self.merged else self.adapters[n].row_scale(original) for n in names}
        new = original.clone()
        for n, c in scales.items():
            d = self.adapters[n].delta_weight().double()
            new += d if c is None else c.double()[:, None] * (original + d) - original
        return new, scales

    def check_mergeable(self, names: list[str]) -> list[str]:
        """The names this layer holds, in order; MergeError if one cannot be merged."""
        names = [n for n in dict.fromkeys(names) if n in self.adapters]
        for n in names:
            if not self.adapters[n].mergeable:
                raise MergeError(f"adapter {n!r} ({self.adapters[n].name}) cannot be merged into one weight")
        return names

    @torch.no_grad()
    def set_merged(self, names: list[str]) -> None:
        """Make exactly `names` (those this layer holds) merged into the base weight.

        Unmerging restores W up to one fp32 rounding of the merged weight, amplified by 1/c for DoRA:
        within 1e-6·max|W| while ΔW is not much larger than W.
        """
        if list(self.merged) != self.check_mergeable(names):
            new, self.merged = self.merged_weight(names)
            self._write_weight(new)

    def _unmerged_weight(self) -> torch.Tensor:
        """W recovered from merged = W·(1 + Σ(c−1)) + Σ c·ΔW (c = 1 for plain deltas); fp64 (out, in).

        fp64 arithmetic leaves one rounding of the stored weight as the only error. A base that keeps its unmerged
        weight aside (quantized) gives that instead.
        """
        kept = self.kind.kept_weight() if self.merged else None
        if kept is not None:
            return kept.double()
        w = self.kind.weight().double()
        if not self.merged:
            return w
        num, den = w.clone(), torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
        for n, c in self.merged.items():
            d = self.adapters[n].delta_weight().double()
            num -= d if c is None else c.double()[:, None] * d
            if c is not None:
                den += c.double() - 1
        return num / den[:, None]

    def _write_weight(self, matrix: torch.Tensor) -> None:
        self.kind.write_weight(matrix, merged=bool(self.merged))


def _bind(variant, routing, plan=None, start: int = 0, stop: int = 0, total_rows: int = 0) -> None:
    """Tell a variant that reads per-token routing (`reads_routing`, e.g. MM-LoRA's modality masks) the routing
    and which rows of the layer input its next call covers: `plan.order[start:stop]` of `total_rows`, or all."""
    if getattr(variant, "reads_routing", False):
        variant.bind_routing(routing, None if plan is None else plan.order[start:stop], total_rows or None)


HALF = (torch.bfloat16, torch.float16)
SHRINK = "fused shrink"  # key of the last layer's shared fused shrink in `Plan.shared`


def _version(x: torch.Tensor) -> int | None:
    """x's version counter (it counts in-place changes); None for inference-mode tensors, which have none."""
    return None if x.is_inference() else x._version


def _compute_in(dtype: torch.dtype, device: torch.device):
    """On a half-precision base, adapters (fp32 master weights) compute in the base's dtype: autocast casts each
    factor to it for the matmuls (gradients flow back to the fp32 parameters), as mixed-precision training does.
    An fp32 adapter on a bf16 base adds 58-342 % to one layer's time (measured on this project's CPU)."""
    return torch.autocast(device.type, dtype=dtype) if dtype in HALF else contextlib.nullcontext()


def _cast(x: torch.Tensor, variant, base_dtype: torch.dtype) -> torch.Tensor:
    """Adapter inputs: in the base's dtype when that is half precision (see `_compute_in`), else in the adapter's
    dtype (ids stay integers)."""
    if not x.is_floating_point():
        return x
    return x.to(base_dtype) if base_dtype in HALF else x.to(variant.lora_dtype)


class TrainedCopy(nn.Module):
    """PEFT's `modules_to_save`: a fully trained copy of a module (e.g. a classification head) per adapter."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self.routing = None

    def forward(self, x, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing is None:
            name = next((n for n in self.active if n in self.copies), None)
            return (self.copies[name] if name else self.original_module)(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        plan = self.routing.plan(x.shape[0], x.device)
        for name, start, stop in plan.segments:
            if name in self.copies:
                idx = plan.order[start:stop]
                out = out.index_copy(0, idx, self.copies[name](x.index_select(0, idx), *args, **kwargs))
        return out
