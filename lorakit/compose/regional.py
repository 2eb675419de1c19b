"""Regional multi-LoRA composition for diffusion UNets: per-token masks and attention hooks (compose.md §1, §2).

Three pieces, one mechanism each:

- `RegionGate(names, masks)`: a gate for `lorakit.route(unet, weights=gate, adapters=names)` (use `gate.route(unet)`)
  that gives every adapted layer the weight of each adapter on each of its tokens from spatial masks or boxes at
  latent resolution, mapped onto that layer's token grid. Tokens outside every region get weight 0 (the base output,
  exactly). Each adapter acts in every layer it adapts, only on its region (Mix-of-Show style regional LoRA).
- `LoRAComposer(regions)` (Yang et al. 2024): a `Schedule` for `sample(...)` whose UNet passes run the *base* model
  with two diffusers attention processors: `ConceptInjection` (cross-attention: inside each box the output is
  attention with the base Q of the box pixels and K, V, to_out from that concept's LoRA on its region prompt,
  overlapping boxes averaged) and `ConceptIsolation` (self-attention: an additive −1e6 score mask so that a query in
  box k cannot attend to keys in any other box). `reinit=True` adds the latent re-initialisation before step 0
  (`reinitialise`). The LoRAs act only inside these processors, never on the base Q or the rest of the UNet.
- `CLoRA(names)` (Meral et al. 2025): a `Schedule` that runs one pass per prompt (a plain prompt without LoRA and one
  prompt per LoRA, each pass with only its LoRA), derives a mask per LoRA from the cross-attention maps of its mask
  tokens (`clora_masks`) and fuses the predictions ε = Σⱼ Mⱼ εⱼ / Σⱼ Mⱼ (`fuse`); optionally the contrastive latent
  update z ← z − η∇L_NT-Xent (`contrast=`).

Geometry. A layer's token grid (h, w) is found from its tokens per row and the latent (H, W) by halving with
ceiling (H → ⌈H/2⌉ → …, as the UNet's stride-2 convolutions do) until h·w matches; the latent shape and the row
count come from a forward pre-hook on the UNet. A box [top, left, bottom, right] (fractions of the latent) covers
rows ⌈top·h⌉ … ⌊bottom·h⌋ − 1 and columns ⌈left·w⌉ … ⌊right·w⌋ − 1 of a grid [code: LoRA-Composer] (a box can be
empty on a coarse grid). Per-sample inputs (masks, region prompts) with R rows serve a UNet batch of N = m·R rows
tiled: row r uses input row r mod R, which fits `sample`'s CFG batch [uncond; cond] (R = latent batch for masks;
region / per-LoRA prompts give both halves, R = 2·batch, [negative; prompt], as `sample` stacks them).

[U] choices, each also named where it acts:
- Geometry: per-sample inputs tile the UNet batch (above); an attention module called on its own (not through the
  UNet, so no latent shape recorded) is taken to have a square grid; `downscale` is a power of two.
- RegionGate: layers whose inputs are prompt tokens (cross-attention `to_k` / `to_v`) get weight 0 for every adapter,
  i.e. base K, V over the global prompt: a text token serves every pixel, so it has no region. A concept's K, V come
  from `ConceptInjection` instead (its LoRA on its region prompt, read by the box pixels only). Masks are resized to a
  layer's grid by nearest neighbour (torch `interpolate`, mode "nearest"); boxes are mapped per grid as above.
  Overlapping soft masks add (base + Σ wⱼΔⱼ, the routing's rule), nothing is renormalised.
- LoRAComposer: boxes are shared by every sample of the batch; the region prompt defaults to the global prompt;
  the isolation penalty of a query in several boxes is −1e6 times the number of (its box k, key's box j ≠ k) pairs,
  as the reference sums them; in half precision the penalty is clamped to finfo.min / 2 (no −inf, no NaN).
- Latent re-initialisation: the concept maps are the softmax(Q Kₖᵀ) of `ConceptInjection` over the whole image at
  grid latent/`downscale` (default 4: 16×16 for a 64×64 latent), averaged over layers at that grid, heads and both
  CFG halves of each sample; the window is the single best one (top-1); per-sample mean/std (the reference has batch
  1); token indices index the full prompt sequence (the reference strips BOS/EOS first: same tokens, offset by one);
  regions without tokens are left in place.
- CLoRA: maps are averaged per sample (the reference has batch 1); the recorder recomputes Q, K of the recorded
  layers rather than replacing their processor, so every pass's output is the unhooked model's, bit for bit; a LoRA
  without mask tokens has an empty mask; with `plain=False` pixels no mask covers take the uniform mean of all
  predictions; the contrastive loss is summed over samples; min-max normalisation divides by max(max − min, 1e-12).

Not done: LoRA-Composer's concept-enhancement losses (L_fg, L_fill, L_region and their latent gradient steps), the
optional mask morphology of CLoRA (erode/dilate/open/close), style LoRAs added to every CLoRA pass, T2I-Adapter
conditions and ED-LoRA's layer-wise (P+) prompt embeddings.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, RoutingError
from ..layers import AdaptedLayer
from ..model import check_names, disabled
from ..routing import BASE, route as _route
from .diffusion import Schedule, _activate, _check_known, _check_linear

__all__ = ["CLoRA", "ConceptInjection", "ConceptIsolation", "LoRAComposer", "PLAIN", "Region", "RegionGate",
           "box_cells", "clora_masks", "fuse", "morph", "nt_xent", "reinitialise"]

PLAIN = BASE  # the key of CLoRA's plain prompt (no LoRA) in `mask_tokens` and `contrast`
PENALTY = 1e6  # LoRA-Composer's additive self-attention mask between boxes [code]


# ---- geometry ----------------------------------------------------------------------------------
def _check_box(box, what: str) -> tuple[float, float, float, float]:
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a box [top, left, bottom, right] in [0, 1], got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be 4 finite numbers [top, left, bottom, right], got {box!r}")
    top, left, bottom, right = values
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
        raise ConfigError(f"{what} {list(values)} must satisfy 0 ≤ top < bottom ≤ 1 and 0 ≤ left < right ≤ 1 "
                          f"(fractions of the latent height and width)")
    return values


def box_cells(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """The cells (top, left, bottom, right), ends exclusive, that a normalised box covers on an h × w grid:
    ⌈top·h⌉, ⌈left·w⌉, ⌊bottom·h⌋, ⌊right·w⌋ [code: LoRA-Composer], with a 1e-9 tolerance for rounding noise."""
    top, left, bottom, right = box
    t, le = math.ceil(top * h - 1e-9), math.ceil(left * w - 1e-9)
    b, r = math.floor(bottom * h + 1e-9), math.floor(right * w + 1e-9)
    return t, le, max(b, t), max(r, le)


def _box_mask(box, h: int, w: int, device=None) -> torch.Tensor:
    t, le, b, r = box_cells(box, h, w)
    m = torch.zeros(h, w, dtype=torch.bool, device=device)
    m[t:b, le:r] = True
    return m


def _grid(size: tuple[int, int], per_row: int) -> tuple[int, int]:
    """The (h, w) with h·w = `per_row` among the latent size halved with ceiling, 0 or more times."""
    h, w = size
    while True:
        if h * w == per_row:
            return h, w
        if h * w < per_row or (h == 1 and w == 1):
            raise RoutingError(f"a layer has {per_row} tokens per row, which is no grid of the {size[0]}×{size[1]} "
                               f"latent halved (with ceiling) any number of times")
        h, w = (h + 1) // 2, (w + 1) // 2


def _tile(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """`t` (R, ...) for a batch of `rows` = m·R rows: row r is t[r mod R]."""
    if rows % t.shape[0]:
        raise RoutingError(f"{what} has {t.shape[0]} rows but the UNet batch has {rows}; the batch must be a multiple "
                           f"(row r uses row r mod {t.shape[0]})")
    return t if rows == t.shape[0] else t.repeat(rows // t.shape[0], *(1,) * (t.dim() - 1))


class _Latent:
    """The latent (rows, H, W) of the UNet call in progress, recorded by a forward pre-hook on the UNet."""

    def __init__(self, check: Optional[Callable] = None):
        self.rows: Optional[int] = None
        self.size: Optional[tuple[int, int]] = None
        self.check = check

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.dim() == 4:
            rows, size = sample.shape[0], tuple(sample.shape[-2:])
            if self.check is not None:
                self.check(rows, size)
            self.rows, self.size = rows, size

    @contextlib.contextmanager
    def watching(self, unet: nn.Module):
        handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def grid(self, per_row: int) -> tuple[int, int]:
        """A layer's (h, w) from its tokens per row; square when no UNet call was seen (a module called alone)."""
        if self.size is not None:
            return _grid(self.size, per_row)
        side = math.isqrt(per_row)
        if side * side != per_row:
            raise RoutingError(f"{per_row} tokens per row: call the attention through the UNet (which records the "
                               f"latent size) or give the latent size (latent_size=)")
        return side, side


def _cross_attention(unet: nn.Module) -> list[str]:
    """Paths of the UNet's cross-attention modules (diffusers `Attention` with `is_cross_attention`)."""
    paths = [key[: -len(".processor")] for key in _processors(unet)]
    return [p for p in paths if getattr(unet.get_submodule(p), "is_cross_attention", False)]


def _processors(unet: nn.Module) -> dict:
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise ConfigError(f"attention hooks need a diffusers model with attention processors (attn_processors, "
                          f"set_attn_processor), got {type(unet).__name__}")
    return unet.attn_processors


@contextlib.contextmanager
def _swapped(unet: nn.Module, make: Callable[[str, object], object]):
    """Replace each attention processor p at `path` by make(path, p) (None keeps p) inside the context."""
    old = _processors(unet)
    new = {}
    for key, p in old.items():
        path = key[: -len(".processor")]
        new[key] = make(path, p) or p
    unet.set_attn_processor(new)
    try:
        yield
    finally:
        unet.set_attn_processor(old)


def _with_adapter(layer: nn.Module, name: Optional[str], x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` with only adapter `name` (None: no adapter), whatever the model's active set, routing or disabled
    flag: exactly the layer's output in a model where `name` alone is active."""
    if not isinstance(layer, AdaptedLayer):
        return layer(x)
    if name is None or name not in layer.adapters:
        return layer.base_layer(x)
    if layer.merged:
        raise RoutingError("attention hooks run one adapter at a time and need unmerged layers; call "
                           "lorakit.unmerge(model) first")
    saved = layer.active, layer.disabled, layer.routing
    layer.active, layer.disabled, layer.routing = [name], False, None
    try:
        return layer(x)
    finally:
        layer.active, layer.disabled, layer.routing = saved


# ---- RegionGate --------------------------------------------------------------------------------
class RegionGate:
    """Per-token weights over adapters from spatial regions, for `lorakit.route(unet, weights=gate, adapters=names)`.

    `masks`: one entry per name (a sequence in the order of `names`, or {name: entry}), each a mask (batch, H, W) or
    (H, W), bool or float in [0, 1], at latent resolution (all masks the same shape), or a box [top, left, bottom,
    right] in [0, 1]. Use `with gate.route(unet): unet(...)`: it records the latent shape and batch of each UNet
    call and knows which layers read prompt tokens. An adapted layer with h·w tokens per row gets each mask resized
    to (h, w) by nearest neighbour, or the box mapped onto (h, w) (`box_cells`); mask rows tile the UNet batch.
    Tokens outside every region: weight 0, the base output bit for bit. Cross-attention `to_k` / `to_v` (inputs are
    prompt tokens, not pixels) get weight 0 [U]: a concept's K, V come from `ConceptInjection`.
    """

    def __init__(self, names: Sequence[str], masks):
        self.names = check_names(names, "RegionGate")
        if isinstance(masks, Mapping):
            if set(masks) != set(self.names):
                raise ConfigError(f"RegionGate masks are keyed by {sorted(masks)}, not by the names {self.names}")
            masks = [masks[n] for n in self.names]
        if isinstance(masks, (str, torch.Tensor)) or not isinstance(masks, Sequence):
            raise ConfigError(f"RegionGate takes one mask or box per name (a list or a dict), got "
                              f"{type(masks).__name__}")
        if len(masks) != len(self.names):
            raise ConfigError(f"RegionGate has {len(self.names)} names but {len(masks)} masks/boxes")
        self.entries: list[tuple[str, object]] = []
        shapes = set()
        for name, m in zip(self.names, masks):
            if isinstance(m, torch.Tensor) and m.dim() in (2, 3):
                m = _check_mask(m, f"the mask of {name!r}")
                shapes.add(tuple(m.shape))
                self.entries.append(("mask", m))
            else:
                self.entries.append(("box", _check_box(m, f"the box of {name!r}")))
        if len(shapes) > 1:
            raise ConfigError(f"RegionGate masks must share one shape (batch, H, W), got {sorted(shapes)}")
        shape = next(iter(shapes), None)
        self.batch = shape[0] if shape else 1
        self.size = shape[1:] if shape else None
        self.latent = _Latent(self._check_call)
        self._text: frozenset[str] = frozenset()
        self._cache: dict[tuple, torch.Tensor] = {}

    def _check_call(self, rows: int, size: tuple[int, int]) -> None:
        if self.size is not None and size != self.size:
            raise RoutingError(f"the masks are {self.size[0]}×{self.size[1]} but the UNet latent is "
                               f"{size[0]}×{size[1]}; give masks at latent resolution")
        if rows % self.batch:
            raise RoutingError(f"the masks have {self.batch} rows but the UNet batch has {rows}; the batch must be a "
                               f"multiple (row r uses mask row r mod {self.batch})")

    def grid_weights(self, rows: int, h: int, w: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """The (rows·h·w, n) weights of a layer whose tokens are `rows` rows of an h × w grid."""
        key = (rows, h, w, dtype, device)
        if key not in self._cache:
            cols = []
            for kind, m in self.entries:
                if kind == "box":
                    grid = _box_mask(m, h, w, device).to(dtype)[None]
                elif (h, w) == tuple(m.shape[1:]):
                    grid = m.to(device, dtype)
                else:
                    grid = F.interpolate(m[:, None].to(device, dtype), size=(h, w), mode="nearest")[:, 0]
                cols.append(_tile(grid, rows, "the masks").reshape(-1))
            self._cache[key] = torch.stack(cols, dim=1)
        return self._cache[key]

    def __call__(self, path: str, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        if path in self._text:
            return x.new_zeros(tokens, len(self.names))
        rows = self.latent.rows
        if rows is None:
            raise RoutingError("a RegionGate needs the UNet's latent shape: route with `with gate.route(unet): ...`")
        if tokens % rows:
            raise RoutingError(f"layer {path!r} has {tokens} tokens, not a multiple of the UNet batch {rows}")
        h, w = self.latent.grid(tokens // rows)
        return self.grid_weights(rows, h, w, x.dtype if x.is_floating_point() else torch.float32, x.device)

    @contextlib.contextmanager
    def route(self, unet: nn.Module):
        """`lorakit.route(unet, weights=self, adapters=self.names)`, with the latent shape of each call recorded."""
        _check_linear(unet, self.names)
        self._text = frozenset(f"{p}.{proj}" for p in _cross_attention(unet) for proj in ("to_k", "to_v"))
        try:
            with self.latent.watching(unet), _route(unet, weights=self, adapters=self.names) as routing:
                yield routing
        finally:
            self._cache.clear()


def _check_mask(m: torch.Tensor, what: str) -> torch.Tensor:
    if m.dtype == torch.bool:
        m = m.float()
    elif not m.is_floating_point():
        raise ConfigError(f"{what} must be bool or floating point, got {m.dtype}")
    elif not bool(((m >= 0) & (m <= 1)).all()):
        raise ConfigError(f"{what} has values outside [0, 1]")
    if m.dim() == 2:
        m = m[None]
    if m.shape[0] == 0 or m.shape[1] == 0 or m.shape[2] == 0:
        raise ConfigError(f"{what} must be shaped (batch, H, W) or (H, W), got {tuple(m.shape)}")
    return m


# ---- attention processors ----------------------------------------------------------------------
class _Attention:
    """diffusers' `AttnProcessor` computation (explicit probabilities) with two hooks for subclasses: an additive
    score mask (`_scores_mask`) and a rewrite of the output after `to_out` (`_rewrite`)."""

    kind = "attention"

    def __init__(self, composer: LoRAComposer, path: str = ""):
        self.composer, self.path = composer, path

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)
        context = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        batch, length = context.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, self._scores_mask(attn, query, key, attention_mask))
        if self.composer.watch is not None:
            self.composer.watch(self.path, self.kind, probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        out = self._rewrite(attn, out, query, context)
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _scores_mask(self, attn, query, key, attention_mask):
        return attention_mask

    def _rewrite(self, attn, out, query, context):
        return out


class ConceptIsolation(_Attention):
    """LoRA-Composer's concept isolation, for self-attention: scores from a query in box k to a key in box j ≠ k get
    −1e6 (per such pair [U]; clamped to finfo.min / 2 in half precision), so those probabilities underflow to 0;
    queries outside every box are unrestricted. Without boxes it is diffusers' `AttnProcessor`."""

    kind = "self"

    def _scores_mask(self, attn, query, key, attention_mask):
        regions = self.composer.regions
        if not self.composer.isolation or not regions or key.shape[1] != query.shape[1]:
            return attention_mask
        dtype = torch.float32 if attn.upcast_attention else query.dtype
        cache_key = (query.shape[1], dtype, query.device)
        penalty = self.composer._penalties.get(cache_key)
        if penalty is None:
            h, w = self.composer.latent.grid(query.shape[1])
            work = torch.float64 if dtype == torch.float64 else torch.float32
            m = torch.stack([_box_mask(r.box, h, w, query.device).reshape(-1) for r in regions]).to(work)
            inside = m.sum(0)
            pairs = inside[:, None] * inside[None, :] - m.T @ m  # Σ_k Σ_{j≠k} m_k[query] m_j[key]
            penalty = pairs * -PENALTY
            if torch.finfo(dtype).bits < 32:  # no −inf in half precision
                penalty = penalty.clamp_min(torch.finfo(dtype).min / 2)
            penalty = penalty.to(dtype)[None]
            self.composer._penalties[cache_key] = penalty
        return penalty if attention_mask is None else attention_mask + penalty


class ConceptInjection(_Attention):
    """LoRA-Composer's concept injection, for cross-attention: the base attention over the global prompt everywhere,
    then inside each box the output is replaced by softmax(Q_box Kₖᵀ)Vₖ through to_out, with Q the base query of the
    box pixels and Kₖ, Vₖ, to_out computed with concept k's LoRA alone on its region prompt (`Region.emb`, default
    the global prompt); where boxes overlap their outputs are averaged. With `composer.injection` False it only
    records the concept maps (for `reinitialise`)."""

    kind = "cross"

    def _rewrite(self, attn, out, query, context):
        comp = self.composer
        store = comp._store
        if not comp.regions or not (comp.injection or store is not None):
            return out
        rows, per_row = out.shape[0], query.shape[1]
        h, w = comp.latent.grid(per_row)
        store = store if store is not None and store.grid == (h, w) else None
        cells = [_box_mask(r.box, h, w, out.device).reshape(-1) for r in comp.regions]
        count = torch.stack(cells).sum(0)
        new = out.masked_fill((count > 0)[None, :, None], 0) if comp.injection else out
        for k, region in enumerate(comp.regions):
            index = cells[k].nonzero().flatten()
            if not len(index) and store is None:
                continue
            ctx = context if region.emb is None else _tile(region.emb.to(out.device, out.dtype), rows,
                                                            f"the region prompt of {region.name!r}")
            if region.emb is not None and attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            key = attn.head_to_batch_dim(_with_adapter(attn.to_k, region.name, ctx))
            value = attn.head_to_batch_dim(_with_adapter(attn.to_v, region.name, ctx))
            if store is not None:  # the concept's map over the whole image
                probs = attn.get_attention_scores(query, key, None)
                store.add(k, probs, attn.heads)
                probs = probs.index_select(1, index)
            else:
                probs = attn.get_attention_scores(query.index_select(1, index), key, None)
            if comp.watch is not None:
                comp.watch(self.path, f"region:{k}", probs)
            if comp.injection and len(index):
                o = attn.batch_to_head_dim(torch.bmm(probs, value))
                o = attn.to_out[1](_with_adapter(attn.to_out[0], region.name, o))
                new = new.index_add(1, index, o / count.index_select(0, index).to(o.dtype)[None, :, None])
        return new


class _Recorder:
    """Wraps a cross-attention processor: its output unchanged; the attention probabilities softmax(QKᵀ/√d) of
    layers at the store's grid recomputed (same projections) and stored."""

    def __init__(self, inner, store: _Maps, latent: _Latent):
        self.inner, self.store, self.latent = inner, store, latent

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        x = hidden_states
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if self.latent.grid(x.shape[1]) != self.store.grid:
            return out
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        query, key = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(context))
        self.store.add(0, attn.get_attention_scores(query, key, mask), attn.heads)
        return out


class _Maps:
    """Attention maps at one grid, per key: summed over the layers at that grid, heads averaged."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def add(self, key: int, probs: torch.Tensor, heads: int) -> None:
        p = probs.unflatten(0, (-1, heads)).mean(1)  # (rows, h·w, tokens)
        self.sums[key] = p if key not in self.sums else self.sums[key] + p
        self.counts[key] = self.counts.get(key, 0) + 1

    def get(self, key: int, batch: int) -> torch.Tensor:
        """(batch, h, w, tokens): averaged over layers, heads and the rows of each sample (rows r ≡ b mod batch)."""
        if key not in self.sums:
            raise RoutingError(f"no cross-attention layer has a {self.grid[0]}×{self.grid[1]} grid; choose a "
                               f"downscale whose grid the UNet has")
        p = self.sums[key] / self.counts[key]
        p = p.unflatten(0, (-1, batch)).mean(0)
        return p.view(batch, *self.grid, p.shape[-1])


# ---- LoRA-Composer -----------------------------------------------------------------------------
@dataclass
class Region:
    """One concept of LoRA-Composer: adapter `name`, `box` [top, left, bottom, right] in [0, 1] of the latent,
    `emb` its region prompt embedding (rows, tokens, dim; None: the global prompt) and `tokens`, the indices of its
    concept tokens in that prompt (used by the latent re-initialisation)."""

    name: str
    box: Sequence[float]
    emb: Optional[torch.Tensor] = None
    tokens: Sequence[int] = ()


def _check_regions(regions) -> list[Region]:
    if isinstance(regions, Region) or not isinstance(regions, Sequence):
        raise ConfigError(f"regions must be a list of Region, got {type(regions).__name__}")
    out = []
    for i, r in enumerate(regions):
        if not isinstance(r, Region):
            raise ConfigError(f"regions[{i}] must be a Region(name, box, emb, tokens), got {type(r).__name__}")
        if not isinstance(r.name, str):
            raise ConfigError(f"regions[{i}].name must be an adapter name, got {r.name!r}")
        box = _check_box(r.box, f"the box of region {i} ({r.name!r})")
        if r.emb is not None and (not isinstance(r.emb, torch.Tensor) or r.emb.dim() != 3
                                  or not r.emb.is_floating_point()):
            raise ConfigError(f"region {i} ({r.name!r}): emb must be a float tensor (rows, tokens, dim), got "
                              f"{tuple(r.emb.shape) if isinstance(r.emb, torch.Tensor) else type(r.emb).__name__}")
        out.append(Region(r.name, box, r.emb, _check_tokens(r.tokens, f"region {i} ({r.name!r}) tokens")))
    return out


def _check_tokens(tokens, what: str) -> list[int]:
    if isinstance(tokens, (str, torch.Tensor)) or not isinstance(tokens, Sequence):
        raise ConfigError(f"{what} must be a list of token indices, got {tokens!r}")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
        raise ConfigError(f"{what} must be non-negative integer token indices, got {list(tokens)}")
    return list(tokens)


def _check_downscale(downscale) -> int:
    if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1 or downscale & (downscale - 1):
        raise ConfigError(f"downscale must be a power of two (attention grid = latent / downscale), got "
                          f"{downscale!r}")
    return downscale


class LoRAComposer(Schedule):
    """LoRA-Composer as a `Schedule` for `sample(...)`: every step is one pass of the base UNet (adapters disabled)
    with `ConceptInjection` on cross-attention and `ConceptIsolation` on self-attention (`injection=`, `isolation=`
    switch them). `reinit=True`: before step 0, one pass at t₀ records each concept's map at grid latent/`downscale`
    and `reinitialise` moves the latents (that pass counts in `passes`; the maps stay in `self.maps`).

    Outside `sample`, `with composer.installed(unet): unet(...)` runs the same hooked base model. `watch(path, kind,
    probs)` (optional) sees every attention's probabilities: kind "self", "cross" or "region:k" (box rows only).
    [U] choices: see the module docstring."""

    def __init__(self, regions: Sequence[Region], isolation: bool = True, injection: bool = True,
                 reinit: bool = False, downscale: int = 4, watch: Optional[Callable] = None):
        super().__init__()
        self.regions = _check_regions(regions)
        self.names = list(dict.fromkeys(r.name for r in self.regions))
        self.isolation, self.injection, self.reinit = bool(isolation), bool(injection), bool(reinit)
        self.downscale = _check_downscale(downscale)
        if self.reinit and not any(r.tokens for r in self.regions):
            raise ConfigError("reinit=True moves each concept to the window where its tokens attend most; give the "
                              "regions their concept tokens (Region(tokens=[...]))")
        if watch is not None and not callable(watch):
            raise ConfigError(f"watch must be callable(path, kind, probs), got {type(watch).__name__}")
        self.watch = watch
        self.latent = _Latent()
        self.maps: Optional[list[torch.Tensor]] = None
        self._store: Optional[_Maps] = None
        self._penalties: dict[tuple, torch.Tensor] = {}

    def processors(self, unet: nn.Module) -> dict:
        """{processor key: processor} for `unet.set_attn_processor`: ConceptInjection on cross-attention,
        ConceptIsolation on self-attention."""
        out = {}
        for key in _processors(unet):
            path = key[: -len(".processor")]
            cross = getattr(unet.get_submodule(path), "is_cross_attention", False)
            out[key] = (ConceptInjection if cross else ConceptIsolation)(self, path)
        return out

    @contextlib.contextmanager
    def installed(self, unet: nn.Module, base: bool = True):
        """The hooked model inside the context: processors installed (the previous ones back after), the latent
        shape of each UNet call recorded, and (`base=True`) every adapter disabled outside the hooks."""
        _check_known(unet, self.names)
        ours = self.processors(unet)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_swapped(unet, lambda path, p: ours[f"{path}.processor"]))
            stack.enter_context(self.latent.watching(unet))
            if base:
                stack.enter_context(disabled(unet))
            try:
                yield self
            finally:
                self._penalties.clear()

    def start(self, unet, timesteps):
        _check_known(unet, self.names)
        _processors(unet)
        self.passes, self.maps = 0, None

    def update(self, unet, scheduler, latents, t, emb, i):
        if i != 0:
            return latents
        rows = 2 * latents.shape[0]
        for r in self.regions:
            if r.emb is not None:
                _tile(r.emb, rows, f"the region prompt of {r.name!r}")
                if r.emb.shape[-1] != emb.shape[-1]:
                    raise ConfigError(f"the region prompt of {r.name!r} has width {r.emb.shape[-1]}, the global "
                                      f"prompt {emb.shape[-1]}")
            length = (emb if r.emb is None else r.emb).shape[1]
            if any(tok >= length for tok in r.tokens):
                raise ConfigError(f"region {r.name!r} has tokens {r.tokens} but its prompt has {length} tokens")
        if not self.reinit:
            return latents
        grid = (math.ceil(latents.shape[-2] / self.downscale), math.ceil(latents.shape[-1] / self.downscale))
        for r in self.regions:
            t_, le, b, rt = box_cells(r.box, *grid)
            if r.tokens and (b <= t_ or rt <= le):
                raise ConfigError(f"the box of {r.name!r} covers no cell of the {grid[0]}×{grid[1]} attention grid "
                                  f"(downscale {self.downscale}); enlarge it or lower downscale")
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        self.maps = self.concept_maps(unet, x, t, emb, latents.shape[0])
        return reinitialise(latents, self.maps, [r.box for r in self.regions], [r.tokens for r in self.regions])

    def concept_maps(self, unet, x, t, emb, batch: int) -> list[torch.Tensor]:
        """One hooked pass; each region's map (batch, h, w, tokens) at grid latent/`downscale`."""
        grid = (math.ceil(x.shape[-2] / self.downscale), math.ceil(x.shape[-1] / self.downscale))
        self._store = _Maps(grid)
        try:
            with self.installed(unet):
                self._pass(unet, x, t, emb)
            return [self._store.get(k, batch) for k in range(len(self.regions))]
        finally:
            self._store = None

    def predict(self, unet, x, t, emb, i):
        with self.installed(unet):
            return self._pass(unet, x, t, emb)


def reinitialise(latents: torch.Tensor, maps: Sequence[torch.Tensor], boxes: Sequence[Sequence[float]],
                 tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """LoRA-Composer's latent re-initialisation. For each concept k with tokens: its map (batch, h, w, T) summed
    over its tokens, the box-sized window (box k mapped onto the h × w grid) with the largest sum, and that window's
    latent patch (scaled by latent / grid, from the latents as given) copied into box k; then each sample is
    re-standardised to its original mean and std. Latent size must be a multiple of the grid."""
    if len(maps) != len(boxes) or len(boxes) != len(tokens):
        raise ConfigError(f"reinitialise needs one map, box and token list per concept, got {len(maps)}, "
                          f"{len(boxes)}, {len(tokens)}")
    out = latents.clone()
    batch, _, height, width = latents.shape
    for k, (a, box, toks) in enumerate(zip(maps, boxes, tokens)):
        box, toks = _check_box(box, f"box {k}"), _check_tokens(toks, f"tokens of concept {k}")
        if not toks:
            continue
        if a.dim() != 4 or a.shape[0] != batch:
            raise ConfigError(f"map {k} must be shaped (batch={batch}, h, w, tokens), got {tuple(a.shape)}")
        h, w = a.shape[1:3]
        if height % h or width % w:
            raise ConfigError(f"the latent ({height}×{width}) must be a multiple of the map grid ({h}×{w})")
        sh, sw = height // h, width // w
        t, le, b, r = box_cells(box, h, w)
        if b <= t or r <= le or max(toks) >= a.shape[-1]:
            raise ConfigError(f"concept {k}: box {list(box)} covers no cell of the {h}×{w} grid, or tokens {toks} "
                              f"exceed the map's {a.shape[-1]}")
        score = a[..., toks].sum(-1)[:, None]  # (batch, 1, h, w)
        sums = F.conv2d(score, score.new_ones(1, 1, b - t, r - le))  # every box-sized window
        best = sums.flatten(1).argmax(1)
        for s in range(batch):
            y, x = divmod(int(best[s]), sums.shape[-1])
            out[s, :, t * sh:b * sh, le * sw:r * sw] = latents[s, :, y * sh:(y + b - t) * sh, x * sw:(x + r - le) * sw]
    dims = (1, 2, 3)
    mean, std = latents.mean(dims, keepdim=True), latents.std(dims, keepdim=True)
    return (out - out.mean(dims, keepdim=True)) / out.std(dims, keepdim=True) * std + mean


# ---- CLoRA -------------------------------------------------------------------------------------
MORPHOLOGY = ("erode", "dilate", "open", "close")


def morph(masks: torch.Tensor, op: Optional[str]) -> torch.Tensor:
    """A 3×3 binary erosion / dilation / opening / closing of 0/1 masks (..., h, w), as OpenCV's defaults: outside
    the grid counts as neither (erosion does not eat the border, dilation does not grow from it); None: unchanged."""
    if op is None:
        return masks
    if op not in MORPHOLOGY:
        raise ConfigError(f"morphology must be one of {MORPHOLOGY} or None, got {op!r}")
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    dilate = lambda m: F.max_pool2d(m, 3, stride=1, padding=1)  # noqa: E731 (pads with -inf)
    erode = lambda m: -F.max_pool2d(-m, 3, stride=1, padding=1)  # noqa: E731
    steps = {"erode": (erode,), "dilate": (dilate,), "open": (erode, dilate), "close": (dilate, erode)}[op]
    for step in steps:
        flat = step(flat)
    return flat.reshape(masks.shape)


def clora_masks(maps: Sequence[torch.Tensor], tokens: Sequence[Sequence[int]], size: tuple[int, int],
                alpha: float = 0.3, plain: bool = True, morphology: Optional[str] = None) -> torch.Tensor:
    """CLoRA's masks (P, batch, H, W) from the prompts' maps (each (batch, h, w, T)): Mₚ = ∪_tok 1[A[..., tok] >
    α·max A[..., tok]] (max per sample and token), empty without tokens, then the optional 3×3 `morphology`
    ("erode", "dilate", "open", "close"; `morph`) on each mask at the maps' resolution; where no mask is 1, prompt 0
    (the plain prompt) gets 1 (`plain=True`), or every prompt does (`plain=False` [U]); nearest-upsampled to
    `size`."""
    if len(maps) != len(tokens) or not maps:
        raise ConfigError(f"clora_masks needs one token list per map, got {len(maps)} maps, {len(tokens)} lists")
    masks = []
    for a, toks in zip(maps, tokens):
        m = torch.zeros(a.shape[:3], dtype=torch.bool, device=a.device)
        for tok in toks:
            amap = a[..., tok]
            m |= amap > alpha * amap.amax(dim=(1, 2), keepdim=True)
        masks.append(m)
    masks = morph(torch.stack(masks).to(maps[0].dtype), morphology)  # (P, batch, h, w)
    uncovered = masks.sum(0) == 0
    if plain:
        masks[0] = torch.where(uncovered, torch.ones_like(masks[0]), masks[0])
    else:
        masks = torch.where(uncovered[None], torch.ones_like(masks), masks)
    return F.interpolate(masks, size=tuple(size), mode="nearest")


def fuse(eps: Sequence[torch.Tensor], masks: Optional[torch.Tensor]) -> torch.Tensor:
    """ε = Σₚ Mₚ εₚ / Σₚ Mₚ for predictions εₚ on the CFG batch (2·batch, C, H, W) and masks (P, batch, H, W) (the
    same mask for both halves); `masks=None`: the uniform mean. Every pixel must be covered by some mask."""
    if masks is None:
        return torch.stack(list(eps)).mean(0)
    if masks.dim() != 4 or masks.shape[0] != len(eps) or eps[0].shape[0] % masks.shape[1] \
            or masks.shape[2:] != eps[0].shape[2:]:
        raise RoutingError(f"fuse needs masks (P={len(eps)}, batch, H, W) for predictions {tuple(eps[0].shape)}, "
                           f"got {tuple(masks.shape)}")
    w = masks.to(eps[0].dtype)
    w = w.repeat(1, eps[0].shape[0] // w.shape[1], 1, 1)[:, :, None]  # (P, rows, 1, H, W), rows tile the batch
    total = w.sum(0)
    if not bool((total > 0).all()):
        raise RoutingError("fuse: some latent pixel has weight 0 in every mask")
    return sum(wp * e for wp, e in zip(w, eps)) / total


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with cosine similarity (as pytorch-metric-learning's `NTXentLoss`): the mean over ordered positive
    pairs (a, p), a ≠ p with equal labels, of −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n: label ≠ label_a} e^{s_an/τ}));
    0 without positive pairs."""
    z = F.normalize(embeddings, dim=1)
    s = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=s.device)
    if not bool(pos.any()):
        return s.sum() * 0
    neg = torch.where(~same, s, torch.full_like(s, -math.inf))
    a, p = pos.nonzero(as_tuple=True)
    sp = s[a, p]
    top = torch.maximum(sp, neg[a].amax(1)).detach()
    denominator = torch.exp(sp - top) + torch.exp(neg[a] - top[:, None]).sum(1)
    return -(sp - top - torch.log(denominator)).mean()


class CLoRA(Schedule):
    """CLoRA as a `Schedule` for `sample(...)`. Each step runs one pass per prompt on the same latents: the plain
    prompt (the one given to `sample`, no LoRA; `plain=False` leaves it out) and, per LoRA j, `prompts[j]` (rows,
    tokens, dim; default the plain prompt) with only LoRA j active. Cross-attention probabilities at grid
    latent/`downscale` (default 4) are recorded from each pass (the UNet's output unchanged) and averaged over
    layers, heads and both CFG halves → maps; `clora_masks` turns the maps of each prompt's `mask_tokens` (key
    `PLAIN` for the plain prompt) into masks with threshold `alpha` (0.3) and optional 3×3 `morphology`, and `fuse`
    combines the predictions
    (from step `apply_mask_after` on; before, their uniform mean). The last masks stay in `self.masks` (P, batch,
    H, W), prompts ordered [plain, *names].

    `contrast` (optional): concept groups [{prompt key: [token indices]}, ...]; for steps i < `max_iter` the latents
    move by z ← z − `step_size`·∇_z NT-Xent(τ = `temperature`) over the min-max normalised maps of those tokens
    (same concept across prompts = positives), `repeats` more times at `iterative_steps`; as in the reference code,
    that step then uses the predictions of the last forward, made before the last update [code].
    """

    def __init__(self, names: Sequence[str], prompts: Optional[Mapping[str, torch.Tensor]] = None,
                 mask_tokens: Optional[Mapping[str, Sequence[int]]] = None, alpha: float = 0.3, downscale: int = 4,
                 plain: bool = True, apply_mask_after: int = 0, contrast: Optional[Sequence[Mapping]] = None,
                 step_size: float = 20.0, max_iter: int = 30, iterative_steps: Sequence[int] = (),
                 repeats: int = 20, temperature: float = 0.5, morphology: Optional[str] = None):
        super().__init__(names)
        if morphology is not None and morphology not in MORPHOLOGY:
            raise ConfigError(f"morphology must be one of {MORPHOLOGY} or None, got {morphology!r}")
        self.morphology = morphology
        self.plain = bool(plain)
        self.keys = ([PLAIN] if self.plain else []) + self.names
        prompts = dict(prompts or {})
        mask_tokens = dict(mask_tokens or {})
        if set(prompts) - set(self.names):
            raise ConfigError(f"prompts are keyed by LoRA names {self.names}, got {sorted(prompts)}")
        for name, e in prompts.items():
            if not isinstance(e, torch.Tensor) or e.dim() != 3 or not e.is_floating_point():
                raise ConfigError(f"the prompt of {name!r} must be a float tensor (rows, tokens, dim)")
        if set(mask_tokens) - set(self.keys):
            raise ConfigError(f"mask_tokens are keyed by {self.keys}, got {sorted(mask_tokens)}")
        self.prompts = prompts
        self.mask_tokens = {k: _check_tokens(mask_tokens.get(k, ()), f"mask_tokens[{k!r}]") for k in self.keys}
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
            raise ConfigError(f"alpha is a fraction of each map's maximum, in [0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.downscale = _check_downscale(downscale)
        for what, v in (("apply_mask_after", apply_mask_after), ("max_iter", max_iter), ("repeats", repeats)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{what} must be a non-negative integer, got {v!r}")
        self.apply_mask_after, self.max_iter, self.repeats = apply_mask_after, max_iter, repeats
        self.iterative_steps = set(_check_tokens(iterative_steps, "iterative_steps"))
        for what, v in (("step_size", step_size), ("temperature", temperature)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{what} must be a positive number, got {v!r}")
        self.step_size, self.temperature = float(step_size), float(temperature)
        self.contrast = []
        for c, group in enumerate(contrast or ()):
            if not isinstance(group, Mapping) or set(group) - set(self.keys):
                raise ConfigError(f"contrast[{c}] must map prompt keys {self.keys} to token indices, got {group!r}")
            self.contrast.append({k: _check_tokens(v, f"contrast[{c}][{k!r}]") for k, v in group.items()})
        self.latent = _Latent()
        self.masks: Optional[torch.Tensor] = None
        self._cached: Optional[tuple] = None

    def start(self, unet, timesteps):
        super().start(unet, timesteps)
        _processors(unet)
        self.masks, self._cached = None, None

    def _embedding(self, key: str, emb: torch.Tensor) -> torch.Tensor:
        return emb if key == PLAIN or key not in self.prompts else _tile(self.prompts[key].to(emb.device, emb.dtype),
                                                                          emb.shape[0], f"the prompt of {key!r}")

    def _check_run(self, latents, emb) -> None:
        for key in self.keys:
            e = self._embedding(key, emb)
            if e.shape[-1] != emb.shape[-1]:
                raise ConfigError(f"the prompt of {key!r} has width {e.shape[-1]}, the UNet's prompts {emb.shape[-1]}")
            used = self.mask_tokens[key] + [t for g in self.contrast for t in g.get(key, ())]
            if used and max(used) >= e.shape[1]:
                raise ConfigError(f"token indices {used} of the prompt {key!r} exceed its {e.shape[1]} tokens")

    def passes_with_maps(self, unet, x, t, emb, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One pass per prompt: the predictions and the maps (batch, h, w, tokens), prompts ordered as `keys`."""
        grid = (math.ceil(x.shape[-2] / self.downscale), math.ceil(x.shape[-1] / self.downscale))
        eps, maps = [], []
        for key in self.keys:
            store = _Maps(grid)
            with self.latent.watching(unet), _swapped(unet, lambda path, p: _Recorder(p, store, self.latent)
                                                      if getattr(unet.get_submodule(path), "is_cross_attention",
                                                                 False) else None):
                _activate(unet, [] if key == PLAIN else [key])
                eps.append(self._pass(unet, x, t, self._embedding(key, emb)))
            maps.append(store.get(0, batch))
        return eps, maps

    def loss(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The contrastive loss over `contrast`, summed over samples."""
        total = maps[0].new_zeros(())
        for b in range(maps[0].shape[0]):
            embeddings, labels = [], []
            for c, group in enumerate(self.contrast):
                for key, toks in group.items():
                    a = maps[self.keys.index(key)][b]
                    for tok in toks:
                        e = a[..., tok].reshape(-1)
                        embeddings.append((e - e.min()) / (e.max() - e.min()).clamp_min(1e-12))
                        labels.append(c)
            if embeddings:
                labels_t = torch.tensor(labels, device=total.device)
                total = total + nt_xent(torch.stack(embeddings), labels_t, self.temperature)
        return total

    def update(self, unet, scheduler, latents, t, emb, i):
        if i == 0:
            self._check_run(latents, emb)
        if not self.contrast or i >= self.max_iter:
            return latents
        with torch.enable_grad():
            z = latents.detach()
            for _ in range(1 + (self.repeats if i in self.iterative_steps else 0)):
                z = z.detach().requires_grad_(True)
                x = scheduler.scale_model_input(torch.cat([z, z]), t)
                eps, maps = self.passes_with_maps(unet, x, t, emb, z.shape[0])
                loss = self.loss(maps)
                grad = torch.autograd.grad(loss, z, allow_unused=True)[0] if loss.requires_grad else None
                z = z if grad is None else z - self.step_size * grad
        self._cached = (i, [e.detach() for e in eps], [m.detach() for m in maps])
        return z.detach()

    def predict(self, unet, x, t, emb, i):
        if self._cached is not None and self._cached[0] == i:
            _, eps, maps = self._cached
        else:
            eps, maps = self.passes_with_maps(unet, x, t, emb, x.shape[0] // 2)
        self._cached = None
        if i < self.apply_mask_after:
            self.masks = None
            return fuse(eps, None)
        self.masks = clora_masks(maps, [self.mask_tokens[k] for k in self.keys], x.shape[-2:], self.alpha,
                                 self.plain, self.morphology)
        return fuse(eps, self.masks)
