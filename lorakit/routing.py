"""Which adapter applies to which rows of a batch: built once, shared by every adapted layer.

`with lorakit.route(model, adapter_names=[...]):` assigns one adapter (or "__base__") to each row.
The rows are stably sorted by adapter once; each layer then runs every distinct adapter on its
contiguous slice at that adapter's own rank. The plan for a given number of rows is cached, so a
model forward builds it at most once, and it stays valid for a backward that recomputes
(gradient checkpointing) as long as the context is open.

Rows are the first axis of each layer's input. An input with k·N rows for N names (beam search,
`num_return_sequences`, or a model that flattens (batch, tokens) into one token axis) maps row i
to name i // k, i.e. the names are repeat-interleaved over the flattened token axis.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import RoutingError

BASE = "__base__"


@dataclass
class Plan:
    """Routed rows in stable adapter order, and each adapter's [start, stop) slice of `order`."""

    order: torch.Tensor  # long, rows that use some adapter, grouped by adapter
    segments: list[tuple[str, int, int]]
    identity: bool  # order == arange(len(order)): slices of the input are views, no gather needed
    _last: tuple | None = field(default=None, repr=False, compare=False)  # (input, version, gathered)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The routed rows of `x` in `order`. Layers fed the same tensor (q/k/v projections) share one gather
        (not for inference-mode tensors: they have no version counter to detect in-place changes)."""
        if self.identity:
            return x
        if x.is_inference():
            return x.index_select(0, self.order)
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        gathered = x.index_select(0, self.order)
        self._last = (x, x._version, gathered)
        return gathered

    def release(self) -> None:
        self._last = None


class Routing:
    """Per-row adapter names for one batch; plans are computed once per (rows, device)."""

    def __init__(self, adapter_names: list[str], ranks: dict[str, int] | None = None):
        self.names = list(adapter_names)
        self.distinct = list(dict.fromkeys(n for n in self.names if n != BASE))
        self.ranks = ranks or {}  # when rows must be gathered anyway, same-rank adapters go side by side
        self._plans: dict[tuple[int, torch.device], Plan] = {}

    def release(self) -> None:
        """Drop the tensors plans keep for sharing gathers (the plans themselves stay valid)."""
        for plan in self._plans.values():
            plan.release()

    def plan(self, rows: int, device: torch.device) -> Plan:
        key = (rows, device)
        if key not in self._plans:
            self._plans[key] = self._build_plan(rows, device)
        return self._plans[key]

    def _build_plan(self, rows: int, device: torch.device) -> Plan:
        n = len(self.names)
        if n == 0 or rows % n:
            raise RoutingError(f"routing has {n} adapter names but a layer got {rows} rows; "
                               f"the row count must be a multiple of the number of names")
        k = rows // n
        members: dict[str, list[int]] = {name: [] for name in self.distinct}
        for i, name in enumerate(self.names):  # one pass; rows stay in their original order per adapter
            if name != BASE:
                members[name].extend(range(i * k, (i + 1) * k))
        natural = [i for rows_of in members.values() for i in rows_of]
        identity = natural == list(range(len(natural)))
        groups = list(members.items())
        if not identity:  # rows are gathered anyway: put adapters of equal rank and size side by side
            groups.sort(key=lambda item: (self.ranks.get(item[0], 0), len(item[1])))
        order, segments = [], []
        for name, rows_of in groups:
            segments.append((name, len(order), len(order) + len(rows_of)))
            order += rows_of
        return Plan(torch.tensor(order, dtype=torch.long, device=device), segments, identity)


def routed_modules(model: nn.Module) -> list[nn.Module]:
    from .layers import AdaptedLayer, TrainedCopy

    return [m for m in model.modules() if isinstance(m, (AdaptedLayer, TrainedCopy))]


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: list[str]):
    """Run each row of the batch with its own adapter ("__base__" = none) inside this context.

    Works for forward, `generate()` and backward (training on a mixed batch sends each adapter the
    gradient of its own rows only). Refused while any layer is merged.
    """
    from .model import adapter_names as known_names, get_config

    known = set(known_names(model))
    unknown = sorted({n for n in adapter_names if n != BASE} - known)
    if unknown:
        raise RoutingError(f"unknown adapter name(s) {unknown}; this model has {sorted(known)} and {BASE!r}")
    modules = routed_modules(model)
    if any(getattr(m, "merged", None) for m in modules):
        raise RoutingError("mixed-batch routing needs unmerged layers; call lorakit.unmerge(model) first")
    routing = Routing(adapter_names, {n: get_config(model, n).r for n in known})
    previous = [m.routing for m in modules]
    for m in modules:
        m.routing = routing
    try:
        yield routing
    finally:
        for m, prev in zip(modules, previous):
            m.routing = prev
        routing.release()
