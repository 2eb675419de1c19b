"""LoRA add-ons of one engine step for rows of many adapters: the metadata is built once, every layer uses it.

The engine lays out a step's rows grouped by adapter (prefills first, then decodes), so each adapter's rows are
one contiguous slice and no layer permutes activations. Per fused projection group (q/k/v, o, gate/up, down):

- **segments** (prefill rows, or few adapters): per adapter, one shrink GEMM `h = x[s:e] · Aᵀ` at its true rank
  (q, k and v share it) and one `addmm_` per module into its columns of the base output;
- **rank-bucketed bmm** (decode rows of many adapters): adapters whose factors have the same shape in this group
  are stacked once per set of adapters (a copy per *distinct adapter*, reused across steps while the set is
  unchanged, never per token and never padded to a global max rank) and run as two `bmm` calls.

`kernel="auto"` uses the fused CPU kernels of `lorakit.kernels` when they are built (one shrink for the whole group
and one expand per module, every adapter at its own rank, for all rows of the step); without them, bmm for a decode
bucket of at least `bmm_min_adapters` adapters whose set was already there in the previous step (stacks are then
reused), segments otherwise — the switch point measured in BENCHMARKS.md (serve_kernels). "fused", "segment" and
"bmm" force one kind. Base-model rows are in no segment and cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from .adapters import LoadedAdapter

NO_ORDER = torch.empty(0, dtype=torch.long)  # the fused kernels read the step's rows in place


@dataclass
class Segment:
    adapter: LoadedAdapter
    start: int
    stop: int
    decode: bool  # one row per sequence (so `stop - start` sequences share the adapter)


class StackCache:
    """Stacked factors (and the fused kernels' factor lists) per (layer, group, adapters), kept from one step to the
    next.

    Building a stack copies every factor of the set once, which costs about what the segment kernel costs (see
    BENCHMARKS.md, serve_kernels); reusing it makes bmm up to ~2× faster. So in "auto" mode a set is stacked only
    when it was already seen in the previous step (stable sets, e.g. steady decoding), and runs as segments otherwise.
    """

    def __init__(self):
        self._current: dict[tuple, tuple] = {}
        self._previous: dict[tuple, tuple] = {}

    def new_step(self) -> None:
        if self._current:
            self._previous, self._current = self._current, {}

    def get(self, layer: int, group, adapters: tuple, build, only_if_stable: bool = False):
        """The stacks of `adapters`, built now if needed; with `only_if_stable`, None for a set new since last step."""
        key = (layer, group, tuple(map(id, adapters)))
        hit = self._current.get(key)
        if hit is None:
            hit = self._previous.get(key)
            # entries keep their adapters alive, so equal ids mean the same objects, not reused addresses
            if hit is None or any(a is not b for a, b in zip(hit[0], adapters)):
                hit = (adapters, None if only_if_stable else build())
            elif hit[1] is None:
                hit = (adapters, build())
            self._current[key] = hit
        elif hit[1] is None and not only_if_stable:
            hit = self._current[key] = (adapters, build())
        return hit[1]


class LoraStep:
    """Which rows of a step use which adapter, and the add-on kernels that read it."""

    def __init__(self, segments: list[Segment], stacks: StackCache, kernel: str = "auto", bmm_min_adapters: int = 4):
        self.segments = segments
        self.kernel, self.bmm_min = kernel, bmm_min_adapters
        self.stacks = stacks
        stacks.new_step()
        decodes = [s for s in segments if s.decode]
        self.prefills = [s for s in segments if not s.decode]
        # decode segments grouped by rows per adapter (bmm needs equal rows per adapter); rank buckets come per group
        by_rows: dict[int, list[Segment]] = {}
        for s in decodes:
            by_rows.setdefault(s.stop - s.start, []).append(s)
        self._decode_sets = list(by_rows.values())
        self._buckets: dict[tuple[int, str], list] = {}
        self._layout = None  # (bounds, adapter or None per kernel segment), built on the first fused call
        self._fuses: dict[torch.dtype, bool] = {}  # per activation dtype: whether the fused kernels run this step
        self._targeted = set().union(*(s.adapter.groups.keys() for s in segments))  # (layer, group) of any adapter

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += Σ_adapters s·x·Aᵀ·Bᵀ on each adapter's rows, for the modules of `group` this adapter targets."""
        if (layer, group) not in self._targeted:
            return
        fused = self._fuses.get(x.dtype)
        if fused is None:  # decided once per step: every layer sees the same device, dtype and kernel mode
            fused = self._fuses[x.dtype] = self.kernel == "fused" or (self.kernel == "auto" and kernels.uses(x))
        if fused and self._fused(layer, group, x, out):
            return
        for seg in self.prefills:
            self._segment(seg, layer, group, x, out)
        for bucket in self._decode_buckets(layer, group):
            use_bmm = self.kernel == "bmm" or (self.kernel == "auto" and len(bucket) >= self.bmm_min)
            if not (use_bmm and self._bmm(bucket, layer, group, x, out)):
                for seg in bucket:
                    self._segment(seg, layer, group, x, out)

    def _fused(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> bool:
        """All segments in one shrink call for the group and one expand call per module (`lorakit.kernels`);
        False (nothing done) where the bf16 kernels cannot take these shapes."""
        if self._layout is None:  # kernel segments: the step's segments in row order, rows between them skipped
            self._ops = kernels.sgmv()
            if self._ops is None:
                raise kernels.KernelError("lora_kernel='fused' needs the compiled CPU kernels (see lorakit.kernels)")
            bounds, owners = [0], []
            for s in sorted(self.segments, key=lambda s: s.start):
                if s.start > bounds[-1]:
                    bounds.append(s.start)
                    owners.append(None)
                bounds.append(s.stop)
                owners.append(s.adapter)
            self._layout = torch.tensor(bounds, dtype=torch.long), tuple(owners)
        ops, (bounds, owners) = self._ops, self._layout
        pairs = x.dtype == torch.bfloat16 and kernels.bf16_dot()
        # the factor lists depend on the adapters in row order only: kept across steps (steady decoding reuses them)
        down, modules = self.stacks.get(layer, ("fused", group, pairs), owners,
                                        lambda: _fused_lists(owners, (layer, group), pairs))
        if pairs and (x.shape[-1] % 2 or any((c1 - c0) % 16 for c0, c1 in modules)):
            return False
        if modules:
            h = ops.shrink(x, NO_ORDER, bounds, down)
            for (c0, _), (offsets, ups) in modules.items():
                ops.expand(out, NO_ORDER, bounds, h, offsets, ups, c0)
        return True

    @staticmethod
    def _segment(seg: Segment, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        w = seg.adapter.groups.get((layer, group))
        if w is None:
            return
        w = w.cast(x.dtype)
        h = torch.mm(x[seg.start:seg.stop], w.a.T)
        for r0, r1, c0, c1, bt in w.parts:
            out[seg.start:seg.stop, c0:c1].addmm_(h[:, r0:r1], bt)

    def _decode_buckets(self, layer: int, group: str) -> list[list[Segment]]:
        """Decode segments of this group split by factor layout (ranks) and rows per adapter, in row order."""
        key = (layer, group)
        if key not in self._buckets:
            buckets: dict[tuple, list[Segment]] = {}
            for segs in self._decode_sets:
                for s in segs:
                    w = s.adapter.groups.get(key)
                    if w is not None:
                        buckets.setdefault((s.stop - s.start, w.key), []).append(s)
            self._buckets[key] = list(buckets.values())
        return self._buckets[key]

    def _bmm(self, bucket: list[Segment], layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Run the bucket as two bmm calls; False (nothing done) in auto mode when its set is new this step."""
        adapters = tuple(s.adapter for s in bucket)
        weights = [a.groups[layer, group].cast(x.dtype) for a in adapters]

        def build():
            return (torch.stack([w.a for w in weights]),
                    [torch.stack([w.parts[j][4] for w in weights]) for j in range(len(weights[0].parts))])

        stacks = self.stacks.get(layer, (group, x.dtype), adapters, build, only_if_stable=self.kernel == "auto")
        if stacks is None:
            return False
        a, bts = stacks
        n, rows = len(bucket), bucket[0].stop - bucket[0].start
        first, last = bucket[0].start, bucket[-1].stop
        contiguous = last - first == n * rows and all(s.start == first + i * rows for i, s in enumerate(bucket))
        if contiguous:
            xs = x[first:last].view(n, rows, -1)
        else:
            index = torch.cat([torch.arange(s.start, s.stop) for s in bucket])
            xs = x.index_select(0, index).view(n, rows, -1)
        h = torch.bmm(xs, a.transpose(1, 2))                      # (n, rows, Σr)
        for (r0, r1, c0, c1, _), bt in zip(weights[0].parts, bts):
            if contiguous:
                out[first:last, c0:c1].view(n, rows, c1 - c0).baddbmm_(h[:, :, r0:r1], bt)
            else:
                y = torch.bmm(h[:, :, r0:r1], bt).view(n * rows, c1 - c0)
                out[:, c0:c1].index_add_(0, index, y)
        return True


def _fused_lists(owners: tuple, key: tuple[int, str], pairs: bool) -> tuple[list, dict]:
    """Per kernel segment (an adapter, or None for rows between segments): Aᵀ of the group, and per module's columns
    (c0, c1) the rank offsets and (s·B)ᵀ, as `LoraStep._fused` passes them to the kernels."""
    down, modules = [None] * len(owners), {}
    for i, adapter in enumerate(owners):
        w = adapter.groups.get(key) if adapter is not None else None
        if w is None:
            continue
        down[i], parts = w.fused(pairs=pairs)
        for c0, c1, r0, bt in parts:
            offsets, ups = modules.setdefault((c0, c1), ([0] * len(owners), [None] * len(owners)))
            offsets[i], ups[i] = r0, bt
    return down, modules
