"""Which adapter applies to which rows of a batch: built once, shared by every adapted layer.

`with lorakit.route(model, adapter_names=[...]):` assigns one adapter (or "__base__") to each row.
The rows are stably sorted by adapter once; each layer then runs every distinct adapter on its
contiguous slice at that adapter's own rank. The plan for a given number of rows is cached, so a
model forward builds it at most once.

Rows are the first axis of each layer's input. An input with k·N rows for N names (beam search,
`num_return_sequences`, or a model that flattens (batch, tokens) into one token axis) maps row i
to name i // k, i.e. the names are repeat-interleaved over the flattened token axis.

`with lorakit.route(model, token_masks={"image": mask}):` adds per-token weights (e.g. MM-LoRA's modality
mask), alone or together with per-row names. A mask is defined on the flattened token axis of the batch
(`batch × seq`, any shape with that many elements) and maps onto every layer input shaped (rows, ..., features)
with that many tokens. Variants that read it declare `reads_routing = True`; the adapted layer calls their
`bind_routing(routing, rows, total_rows)` before each call (`rows`: which rows of the layer input the call
covers, None for all of them in order) and they ask `routing.token_weights(key, x, rows, total_rows)`.

`with lorakit.route(model, conditions={"user": u}):` adds named per-row condition vectors (e.g. RecLoRA's user
representation), u float (R, d), alone or with the above. Row i covers tokens [i·k, (i+1)·k) of a layer input with
R·k flattened tokens (R = batch: per sequence, also in `generate()`; R = tokens: per token; R = 1: everywhere).
Variants read them with `routing.condition(key, x, rows, total_rows)`; masks and conditions map rows onto tokens
through one helper (`_on_tokens`).

Gradient checkpointing. A checkpointed block is run again in the backward pass, which may come after the
`route(...)` context has closed, or after another forward with another routing. So the adapter state of the
adapted layers in a block — routing, active adapters, disabled flag — is captured when the block runs and
installed again around its recomputation (`pin_routing`), whether the backward runs inside the context or
after it, reentrant or not. Each recomputation thus uses the routing of its own forward (two routed forwards,
one backward works), token masks included. The gather cache of the plans is emptied when a pinned block starts
and ends, so the recomputation does the same gathers as the forward (non-reentrant checkpointing requires it).
- transformers (`model.gradient_checkpointing_enable()` / `activation_checkpointing_enable()`, before or after
  `inject`): nothing to do. `inject` puts a forward pre-hook on each module with a `gradient_checkpointing`
  flag that holds adapted layers; it wraps that module's `_gradient_checkpointing_func` so that it pins the
  block. With reentrant checkpointing it also makes the block's inputs require grad when none does but the
  block has trainable parameters (a frozen embedding feeding the first layer, `inputs_embeds`): otherwise
  reentrant checkpointing would give the adapters inside no gradient at all.
- `torch.utils.checkpoint.checkpoint` called directly: pass `pin_routing(block)` (or `pin_routing(fn, scope)`)
  as the function, created at forward time; without it a recomputation after the context closes runs
  unrouted. (This cannot be automatic: a recomputation is an ordinary call of the block that nothing marks.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import RoutingError

BASE = "__base__"
PLANS_KEPT = 16  # name lists whose plans a model keeps between route() blocks


@dataclass
class Plan:
    """Routed rows in stable adapter order, and each adapter's [start, stop) slice of `order`."""

    order: torch.Tensor  # long, rows that use some adapter, grouped by adapter
    segments: list[tuple[str, int, int]]
    identity: bool  # order == arange(len(order)): slices of the input are views, no gather needed
    # what layers fed the same input share within one forward: gathers (`shared_gather`), fused shrinks
    shared: dict = field(default_factory=dict, repr=False, compare=False)
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)  # token_layout per tokens per row

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The routed rows of `x` in `order`. Layers fed the same tensor (q/k/v projections) share one gather."""
        return x if self.identity else shared_gather(self.shared, None, x, x, self.order)

    def release(self) -> None:
        self.shared.clear()

    def token_layout(self, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`order` and the segment bounds on the flattened token axis of a layer input with `per_row` tokens per
        row, as the fused kernels take them: (token order, empty when identity; bounds (segments + 1,))."""
        if per_row not in self._tokens:
            order = self.order if per_row == 1 else (self.order[:, None] * per_row + torch.arange(
                per_row, device=self.order.device)).flatten()
            bounds = [a * per_row for _, a, _ in self.segments] + [self.segments[-1][2] * per_row if self.segments
                                                                    else 0]
            self._tokens[per_row] = (order[:0] if self.identity else order.contiguous(),
                                     torch.tensor(bounds, dtype=torch.long))
        return self._tokens[per_row]


def shared_gather(cache: dict, key, x: torch.Tensor, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`source.index_select(0, index)` (`source`: layer input `x` or a view of it), kept in `cache[key]` while `x` is
    the same unchanged tensor, so that layers fed the same input (q/k/v projections) gather once (not for
    inference-mode tensors: they have no version counter to detect in-place changes)."""
    if x.is_inference():
        return source.index_select(0, index)
    last = cache.get(key)
    if last is not None and last[0] is x and last[1] == x._version:
        return last[2]
    gathered = source.index_select(0, index)
    cache[key] = (x, x._version, gathered)
    return gathered


class Routing:
    """Per-row adapter names for one batch (plans computed once per (rows, device)) and/or named per-token
    weights. `adapter_names=None`: no per-row routing (the active adapters run on every row)."""

    def __init__(self, adapter_names: list[str] | None, ranks: dict[str, int] | None = None,
                 token_masks: dict[str, torch.Tensor] | None = None, mix: Mix | None = None,
                 conditions: dict[str, torch.Tensor] | None = None, plan_cache: dict | None = None):
        self.names = None if adapter_names is None else list(adapter_names)
        self.mix = mix
        distinct = dict.fromkeys(self.names or ())  # (C-level passes: with many adapters this runs per route())
        distinct.pop(BASE, None)
        self.distinct = list(distinct)
        self.ranks = ranks or {}  # when rows must be gathered anyway, same-rank adapters go side by side
        self.token_masks = {k: _check_mask(k, m) for k, m in (token_masks or {}).items()}
        self.conditions = {k: _check_condition(k, c) for k, c in (conditions or {}).items()}
        self._plans: dict[tuple[int, torch.device], Plan] = self._shared_plans(plan_cache)
        self._weights: dict[tuple, torch.Tensor] = {}  # flattened masks and conditions per (key, device, dtype)

    @property
    def per_row(self) -> bool:
        return self.names is not None

    def token_weights(self, key: str, x: torch.Tensor, rows: torch.Tensor | None = None,
                      total_rows: int | None = None) -> torch.Tensor:
        """Mask `key` for a layer input `x` (rows, ..., features), shaped x.shape[:-1] + (1,) in x's dtype.

        `rows` are the rows of the whole layer input (`total_rows` of them) that `x` holds, None for all."""
        if key not in self.token_masks:
            raise RoutingError(f"this routing has no token mask {key!r} (it has {sorted(self.token_masks)}); "
                               f"pass lorakit.route(model, token_masks={{{key!r}: mask}})")
        cache = (key, x.device, x.dtype)
        flat = self._weights.get(cache)
        if flat is None:
            flat = self._weights[cache] = self.token_masks[key].reshape(-1).to(x.device, x.dtype)
        total = x.shape[0] if rows is None else total_rows
        tokens = total * x.shape[1:-1].numel()
        if flat.numel() != tokens:
            raise RoutingError(f"token mask {key!r} has {flat.numel()} tokens but a layer input of shape "
                               f"{tuple(x.shape)} (of {total} rows) has {tokens}; masks are defined on "
                               f"the flattened token axis (batch × seq)")
        return _on_tokens(flat[:, None], x, rows, total_rows)

    def condition(self, key: str, x: torch.Tensor, rows: torch.Tensor | None = None, total_rows: int | None = None,
                  fn: Callable | None = None) -> torch.Tensor:
        """Condition `key` (R, d) for a layer input `x` (rows, ..., features), shaped x.shape[:-1] + (d,) in x's
        dtype: row i of the condition covers tokens [i·k, (i+1)·k) of the R·k flattened tokens of the whole input.

        `rows`/`total_rows` as in `token_weights`. `fn` (optional) maps the (R, d) rows to (R, d') before they are
        spread over the tokens (e.g. a gate: computed once per row instead of once per token); the result is then
        shaped x.shape[:-1] + (d',). Broadcast views where a row covers whole rows of `x` (no per-token copy)."""
        if key not in self.conditions:
            raise RoutingError(f"this routing has no condition {key!r} (it has {sorted(self.conditions)}); "
                               f"pass lorakit.route(model, conditions={{{key!r}: tensor (rows, d)}})")
        cache = ("condition", key, x.device, x.dtype)
        c = self._weights.get(cache)
        if c is None:
            c = self._weights[cache] = self.conditions[key].to(x.device, x.dtype)
        total = x.shape[0] if rows is None else total_rows
        tokens = total * x.shape[1:-1].numel()
        if tokens % c.shape[0]:
            raise RoutingError(f"condition {key!r} has {c.shape[0]} rows but a layer input of shape {tuple(x.shape)} "
                               f"(of {total} rows) has {tokens} tokens; rows map to the flattened token axis "
                               f"(batch × seq), so the token count must be a multiple of the rows")
        if fn is not None:
            c = fn(c)
        return _on_tokens(c, x, rows, total_rows)

    def release(self) -> None:
        """Drop the tensors plans keep for sharing gathers (the plans themselves stay valid)."""
        for plan in self._plans.values():
            plan.release()
        self._weights.clear()
        if self.mix is not None:
            for plan in self.mix._plans.values():
                plan._last.clear()

    def _shared_plans(self, cache: dict | None) -> dict:
        """The plans of earlier routings with the same names and ranks (from the model's `cache`, kept for the last
        PLANS_KEPT name lists), so that repeated `route(model, names)` blocks reuse plans and what layers cached on
        them (the fused kernels' factor lists)."""
        if cache is None or self.names is None:
            return {}
        key = (tuple(self.names), tuple(map(self.ranks.get, self.distinct)))
        plans = cache.pop(key, None)
        if plans is None:
            plans = {}
            while len(cache) >= PLANS_KEPT:
                cache.pop(next(iter(cache)))
        cache[key] = plans  # most recent last
        return plans

    def plan(self, rows: int, device: torch.device) -> Plan:
        key = (rows, device)
        if key not in self._plans:
            self._plans[key] = self._build_plan(rows, device)
        return self._plans[key]

    def _build_plan(self, rows: int, device: torch.device) -> Plan:
        if self.names is None:
            raise RoutingError("this routing has no per-row adapter names")
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


def _on_tokens(t: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, total_rows: int | None) -> torch.Tensor:
    """Spread the R rows of `t` (R, c) over the flattened tokens of a layer input whose rows `rows` (None: all, in
    order) of `total_rows` are `x` (rows, ..., features): shaped x.shape[:-1] + (c,); row i of `t` covers tokens
    [i·k, (i+1)·k), k = tokens / R (the caller has checked that R divides the token count)."""
    total = x.shape[0] if rows is None else total_rows
    inner = x.shape[1:-1]
    c, r = t.shape[-1], t.shape[0]
    if total % r == 0:  # each row of the input lies within one row of `t`: pick rows, broadcast over the rest
        per_input_row = total // r
        if rows is not None:
            index = rows.to(t.device)
            t = t.index_select(0, index // per_input_row if per_input_row > 1 else index)
        elif per_input_row > 1:
            t = t.repeat_interleave(per_input_row, dim=0)
        return t.view(t.shape[0], *(1,) * len(inner), c).expand(*x.shape[:-1], c)
    tokens_per_row = total * inner.numel() // r  # several rows of `t` in one row of the input (per token)
    per_token = t if tokens_per_row == 1 else t.repeat_interleave(tokens_per_row, dim=0)
    per_input_row = per_token.view(total, -1, c)
    if rows is not None:
        per_input_row = per_input_row.index_select(0, rows.to(t.device))
    return per_input_row.view(*x.shape[:-1], c)


def _check_condition(key: str, c) -> torch.Tensor:
    if not isinstance(key, str) or not isinstance(c, torch.Tensor):
        raise RoutingError(f"conditions maps names to tensors, got {key!r}: {type(c).__name__}")
    if not c.is_floating_point():
        raise RoutingError(f"condition {key!r} must be floating point, got {c.dtype}")
    if c.dim() != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise RoutingError(f"condition {key!r} must be shaped (rows, d) with rows = batch, tokens or 1, got "
                           f"{tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise RoutingError(f"condition {key!r} has non-finite values")
    return c


def _check_mask(key: str, mask) -> torch.Tensor:
    if not isinstance(key, str) or not isinstance(mask, torch.Tensor):
        raise RoutingError(f"token_masks maps names to tensors, got {key!r}: {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise RoutingError(f"token mask {key!r} must be bool or floating point (weights in [0, 1]), "
                               f"got {mask.dtype}")
        if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):
            raise RoutingError(f"token mask {key!r} has weights outside [0, 1]")
    return mask


@dataclass
class MixPlan:
    """Static mixing weights mapped onto a layer's `tokens` flattened tokens: per adapter, the tokens it weights
    (None: all of them, no gather) and their weights as a column."""

    index: list[torch.Tensor | None]
    columns: list[torch.Tensor | None]  # (tokens it weights, 1) each, float; None where every weight is 1
    _last: dict[int, tuple] = field(default_factory=dict, repr=False, compare=False)  # adapter → (x, version, rows)

    def gather(self, i: int, x: torch.Tensor, x_tokens: torch.Tensor) -> torch.Tensor:
        """Adapter i's tokens of `x_tokens` (a view of layer input `x`), shared by layers fed the same input."""
        index = self.index[i]
        return x_tokens if index is None else shared_gather(self._last, i, x, x_tokens, index)


class Mix:
    """Weights over adapters on the flattened token axis: `weights` (R, n) for the adapters `names`, row i covering
    tokens [i·k, (i+1)·k) of a layer input with R·k tokens (R = tokens: per token; R = batch: per sequence, also in
    generation; R = 1: everywhere), or a `gate` computing them per layer (`gate(path, x) -> (tokens, n)`)."""

    def __init__(self, names: list[str], weights: torch.Tensor | None = None, gate: Callable | None = None,
                 paths: dict[int, str] | None = None):
        self.names, self.weights, self.gate, self.paths = names, weights, gate, paths or {}
        self._plans: dict[tuple, MixPlan] = {}

    def plan(self, layer: nn.Module, x_tokens: torch.Tensor, tokens: int, dtype: torch.dtype) -> MixPlan:
        """The weights for one layer call (`x_tokens`: its input as (tokens, ...))."""
        if self.gate is not None:
            w = self.gate(self.paths.get(id(layer), ""), x_tokens)
            if not isinstance(w, torch.Tensor) or w.shape != (tokens, len(self.names)):
                raise RoutingError(f"the gate must return a ({tokens}, {len(self.names)}) tensor of weights for "
                                   f"{self.paths.get(id(layer), 'a layer')}, got "
                                   f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
            return _plan_of(w.to(dtype))
        if self.weights.requires_grad:  # trained weights: a fresh graph every call
            return self._static_plan(tokens, x_tokens.device, dtype)
        key = (tokens, x_tokens.device, dtype)
        if key not in self._plans:
            self._plans[key] = self._static_plan(tokens, x_tokens.device, dtype)
        return self._plans[key]

    def _static_plan(self, tokens: int, device: torch.device, dtype: torch.dtype) -> MixPlan:
        rows = self.weights.shape[0]
        if tokens % rows:
            raise RoutingError(f"mixing weights have {rows} rows but a layer input has {tokens} tokens; rows map to "
                               f"the flattened token axis (batch × seq), so the token count must be a multiple")
        w = self.weights.to(device, dtype)
        if rows != tokens:
            w = w.repeat_interleave(tokens // rows, dim=0)
        return _plan_of(w)


def _plan_of(w: torch.Tensor) -> MixPlan:
    """Per adapter (column of the (tokens, n) weights `w`): the tokens it weights and their weights. Weights that
    require grad keep every token (a token at weight 0 still has a gradient for its weight)."""
    index, columns = [], []
    for i in range(w.shape[1]):
        col = w[:, i]
        if w.requires_grad or bool((col != 0).all()):
            index.append(None)
        else:
            index.append(col.nonzero().flatten())
            col = col.index_select(0, index[-1])
        ones = not w.requires_grad and bool((col == 1).all())
        columns.append(None if ones else col[:, None])
    return MixPlan(index, columns)


def _check_weights(weights, adapters) -> tuple[list[str], torch.Tensor | None, Callable | None]:
    """(names, (R, n) weights or None, gate or None) from `route(..., weights=, adapters=)`."""
    if callable(weights) and not isinstance(weights, torch.Tensor):
        if not adapters:
            raise RoutingError("a gate needs adapters=[...]: the names its weight columns refer to")
        return list(adapters), None, weights
    if isinstance(weights, dict):
        if adapters is not None:
            raise RoutingError("give adapters=[...] with a weight tensor, not with a dict of per-adapter weights")
        if not weights:
            raise RoutingError("weights={} names no adapter")
        names = list(weights)
        cols = [_as_float(f"weights[{n!r}]", w).reshape(-1) for n, w in weights.items()]
        if len({c.numel() for c in cols}) != 1:
            raise RoutingError(f"per-adapter weights must have the same number of tokens, got "
                               f"{ {n: c.numel() for n, c in zip(names, cols)} }")
        return names, torch.stack(cols, dim=1), None
    w = _as_float("weights", weights)
    if adapters is None or isinstance(adapters, str):
        raise RoutingError("a weight tensor needs adapters=[...] naming its last dimension's columns")
    names = list(adapters)
    if w.dim() == 0 or w.shape[-1] != len(names):
        raise RoutingError(f"weights must be shaped (..., {len(names)}) for adapters {names}, got {tuple(w.shape)}")
    return names, w.reshape(-1, len(names)), None


def _as_float(what: str, w) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise RoutingError(f"{what} must be a tensor, got {type(w).__name__}")
    w = w.float() if w.dtype == torch.bool else w
    if not w.is_floating_point():
        raise RoutingError(f"{what} must be bool or floating point, got {w.dtype}")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise RoutingError(f"{what} has non-finite values")
    return w


def routed_modules(model: nn.Module) -> list[nn.Module]:
    """The adapted layers and trained copies in `model`, in `model.modules()` order (adapters are not searched:
    with many adapters they are most of the module tree)."""
    from .layers import AdaptedLayer, TrainedCopy

    found, stack = [], [model]
    while stack:
        m = stack.pop()
        if isinstance(m, (AdaptedLayer, TrainedCopy)):
            found.append(m)
        children = m._modules
        if isinstance(m, AdaptedLayer):
            children = {k: c for k, c in children.items() if k != "adapters"}
        stack.extend(c for c in reversed(children.values()) if c is not None)
    return list(dict.fromkeys(found))


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: list[str] | None = None, *,
          token_masks: dict[str, torch.Tensor] | None = None, weights=None, adapters: list[str] | None = None,
          conditions: dict[str, torch.Tensor] | None = None):
    """Route adapters inside this context, one of two ways:

    - `adapter_names`: one adapter per row of the batch ("__base__" = none). Works for forward, `generate()` and
      backward (training on a mixed batch sends each adapter the gradient of its own rows only), also a backward
      after the context closes that recomputes checkpointed blocks (see the module docstring).
    - `weights`: per-token weights over adapters, output = base + Σᵢ wᵢ(token)·ΔWᵢ x. A dict {name: weights with one
      value per token} (masks as bool), a tensor (..., n) with `adapters=[n names]`, or a gate: a callable
      `gate(path, x) -> (tokens, n)` with `adapters=`, called by every adapted layer with its path and its input
      as (tokens, features). Rows of a weight tensor map to the flattened token axis (batch × seq) the way
      `adapter_names` do: (tokens, n) per token, (batch, n) per sequence (also in `generate()`), (1, n) everywhere.
      A gate with `fuses = True` combines instead: `gate(path, h, deltas) -> output`, from the base output h
      (tokens, out) and each adapter's delta on every token (e.g. AutoLoRA's per-channel gated fusion).
      Each adapter runs only on the tokens it weights (a token with weight 0 for every adapter gets the base output
      exactly). The active set does not matter inside; layers a named adapter does not adapt skip it.

    `token_masks` give adapters that read them (e.g. MM-LoRA's modality masks, {"image": mask}) per-token masks,
    one bool or [0, 1] value per token of the flattened batch × seq axis; alone or with either routing.
    `conditions` give adapters that read them (e.g. RecLoRA's user representation, {"user": u}) named per-row
    float vectors u (R, d), rows mapped to the flattened token axis as weight rows are: (batch, d) per sequence
    (also in `generate()`), (tokens, d) per token, (1, d) everywhere; alone or with any of the above.
    Routing is refused while any layer is merged.
    """
    from .layers import AdaptedLayer
    from .model import adapter_ranks

    if adapters is not None and weights is None:
        raise RoutingError("adapters= names the columns of weights=; pass weights too")
    if adapter_names is None and token_masks is None and weights is None and conditions is None:
        raise RoutingError("route() needs adapter_names (one per row), weights (per token), token_masks and/or "
                           "conditions")
    if adapter_names is not None and weights is not None:
        raise RoutingError("route() takes adapter_names (one adapter per row) or weights (per-token mixing), not both")
    mix = None
    if weights is not None:
        names, w, gate = _check_weights(weights, adapters)
        if len(set(names)) != len(names) or BASE in names:
            raise RoutingError(f"mixing needs distinct adapter names (not {BASE!r}), got {names}")
        mix = Mix(names, w, gate, {id(m): p for p, m in model.named_modules()} if gate is not None else None)
    ranks = adapter_ranks(model)
    known = ranks.keys()
    unknown = sorted(set(adapter_names or ()).union(mix.names if mix else ()) - known - {BASE})
    if unknown:
        raise RoutingError(f"unknown adapter name(s) {unknown}; this model has {sorted(known)} and {BASE!r}")
    modules = routed_modules(model)
    if (adapter_names is not None or mix is not None) and any(getattr(m, "merged", None) for m in modules):
        raise RoutingError("routing needs unmerged layers; call lorakit.unmerge(model) first")
    if conditions is not None and not isinstance(conditions, dict):
        raise RoutingError(f"conditions must be a dict of names to (rows, d) tensors, got {type(conditions).__name__}")
    routing = Routing(adapter_names, ranks, token_masks, mix, conditions,
                      plan_cache=model.__dict__.setdefault("_lorakit_plans", {}))
    if adapter_names is None:  # per-token weights, masks or conditions only: module copies keep their normal forward
        modules = [m for m in modules if isinstance(m, AdaptedLayer)]
    previous = [m.routing for m in modules]
    for m in modules:
        m.routing = routing
    try:
        yield routing
    finally:
        for m, prev in zip(modules, previous):
            m.routing = prev
        _unbind(modules)
        routing.release()


def _unbind(modules: Iterable[nn.Module]) -> None:
    """Variants that read the routing forget the one of their last call (the layer binds it before each call)."""
    for m in modules:
        adapters = m._modules.get("adapters")
        for v in adapters.values() if adapters is not None else ():
            if getattr(v, "reads_routing", False):
                v.bind_routing(None)


# ---- gradient checkpointing (see the module docstring) -----------------------------------------
def _state(modules: Iterable[nn.Module]) -> list[tuple]:
    return [(m, m.routing, list(m.active), m.disabled) for m in modules]


def _install(state: list[tuple]) -> None:
    for m, routing, active, disabled in state:
        m.routing, m.active, m.disabled = routing, active, disabled


def _release(state: list[tuple]) -> None:
    for routing in {id(r): r for _, r, _, _ in state if r is not None}.values():
        routing.release()


def pin_routing(fn: Callable, scope: nn.Module | None = None) -> Callable:
    """`fn`, run with the adapter state (routing, active adapters, disabled flag) that the adapted layers inside
    `scope` (default: `fn`, a module) have now, whenever it is called: the function to hand to
    `torch.utils.checkpoint.checkpoint`, so that its recomputation in backward routes as the forward did.

    Call it in the forward, e.g. `checkpoint(pin_routing(block), x, use_reentrant=False)`.
    """
    scope = fn if scope is None else scope
    if not isinstance(scope, nn.Module):
        raise RoutingError(f"pin_routing needs the module whose adapted layers to pin (scope=), got "
                           f"{type(scope).__name__}")
    pinned = _state(routed_modules(scope))
    if not pinned:
        return fn

    def run(*args, **kwargs):
        current = _state(m for m, *_ in pinned)
        _install(pinned)
        _release(pinned)  # no gather cached outside the block: forward and recomputation gather alike
        try:
            return fn(*args, **kwargs)
        finally:
            _release(pinned)
            _install(current)
            _unbind(m for m, *_ in pinned)

    return run


class _PinningCheckpoint:
    """A transformers block's `_gradient_checkpointing_func`, wrapped: pins the block's adapter state for the
    recomputation, and under reentrant checkpointing gives it an input that requires grad when it trains."""

    def __init__(self, func: Callable, block: nn.Module):
        self.func, self.block = func, block

    def __call__(self, fn, *args, **kwargs):
        if torch.is_grad_enabled() and self._reentrant(kwargs) and not _any_requires_grad(args) \
                and any(p.requires_grad for p in self.block.parameters()):
            args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                         else a for a in args)
        return self.func(pin_routing(fn, self.block), *args, **kwargs)

    def _reentrant(self, kwargs) -> bool:
        """False only when the call is known to be non-reentrant (torch's default is reentrant)."""
        keywords = getattr(self.func, "keywords", None) or {}
        return kwargs.get("use_reentrant", keywords.get("use_reentrant", True)) is not False


def _any_requires_grad(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _wrap_checkpoint_func(block: nn.Module, args) -> None:
    """Forward pre-hook: wrap the checkpoint function transformers set (at enable time, before or after inject)."""
    func = block.__dict__.get("_gradient_checkpointing_func")
    if func is not None and not isinstance(func, _PinningCheckpoint):
        block._gradient_checkpointing_func = _PinningCheckpoint(func, block)


def pin_in_checkpoints(model: nn.Module) -> None:
    """Hook every module with a transformers `gradient_checkpointing` flag that holds adapted layers (idempotent)."""
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing") and _wrap_checkpoint_func not in m._forward_pre_hooks.values() \
                and routed_modules(m):
            m.register_forward_pre_hook(_wrap_checkpoint_func)


def unpin_checkpoints(model: nn.Module) -> None:
    """Undo `pin_in_checkpoints`: remove the hooks and give back transformers' checkpoint functions."""
    for m in model.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _wrap_checkpoint_func:
                del m._forward_pre_hooks[key]
        func = m.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _PinningCheckpoint):
            m._gradient_checkpointing_func = func.func
