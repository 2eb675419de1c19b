"""Adapter retrieval: pick the k adapters most relevant to a request, then compose or merge them.

Two retrievers with one interface (`.retrieve(queries, k)` → (indices, cosine scores), both (queries, k)):

- `DescriptionIndex` (the baseline): each adapter's text description embedded with the frozen all-MiniLM-L6-v2
  encoder (`text_embeddings`: mean of the last hidden states over real tokens, `lorakit.train.baseline.mean_pooled`,
  then L2-normalised; loaded on first use, once — as the server's `retrieve`).
- `WeightIndex` with a `WeightEncoder` (AutoLoRA's retriever, Li, Duan et al. 2025; card compose.md §4): no metadata,
  the adapter's *weights* are encoded into the text encoder's space. Per adapted layer l of a fixed `layout` a
  learnable probe x_l ∈ R^{d_in} is sent through the adapter's factors, e_l = s·(x_l Aᵀ)Bᵀ (never forming B·A), then a
  Linear(d_out → dim) shared by the layers of one *type* (the module name's last part: q_proj, v_proj, ...); the
  layer tokens plus learned position embeddings go through a 2-layer transformer encoder, a LayerNorm and a mean pool
  over the tokens → (dim,). Data-free: weights only. `train_encoder` fits it contrastively on adapters with known
  captions: symmetric InfoNCE on L2-normalised (adapter, caption) pairs, batch 32, one caption per adapter drawn per
  step from its list (the card's 3 caption lengths), AdamW 1e-4; the text side is frozen, only the encoder trains.

Retrieval is cosine top-k (`retrieve`); `mixture_weights(scores, temperature)` turns the k scores into softmax
weights for composing the picks: `lorakit.route(model, weights=w[None], adapters=[names of the picks])` (a mixture of
outputs) or `merge_adapters(model, picks, w.tolist(), new_name)` (fusion into one adapter).

An adapter is {layer path: (A (r, in), B (out, r), scale)} — ΔW = scale·B·A — read by `adapter_layers` from a PEFT
LoRA folder (no model needed) or from (model, adapter name) through the merge readers (`compose.layers`), so every
variant they accept is read the same way (one without factors enters as (ΔW, I) or (I, ΔW), exactly).

[U] choices (unspecified by the card or the released code, or changed for a small model):
- `dim` defaults to 384, MiniLM's width (the authors: 768, CLIP-L's); the text side is MiniLM, not CLIP.
- Probes are randn/√d_in (the card: randn), so a probe's norm is ≈ 1 at any width.
- The adapter's scale (α/r, rsLoRA, patterns) is folded into e_l, so the encoder sees ΔW as the model applies it.
- The per-type Linear is keyed by (type, d_out): layers of one type with different widths get their own Linear.
- Transformer layers: pre-LN (as CLIP's), GELU (CLIP: quick-GELU), feed-forward 4·dim, no dropout; positions
  initialised N(0, 0.02²); every Linear and the LayerNorm at PyTorch's defaults; all drawn from `seed`.
- An adapter that lacks a layer of the layout: that token is masked out as a key (src_key_padding_mask) and left out of
  the mean pool, so the embedding does not depend on the probe, projection input or position of a missing layer. An
  adapter with a layer the layout lacks, or factors of another shape, is refused (ConfigError), never dropped.
- Layers are ordered naturally by path (numbers as numbers), so a folder and a model give the same order.
- The card's "logit scale 1, ×10" is read as a fixed (not learned) logits = 10·cos(adapter, caption).
- Negatives are the other pairs of the batch, also when they share a caption (as CLIP's loss); a batch is
  min(batch, number of adapters) adapters drawn without replacement.
- `mixture_weights`' default temperature 0.05 is the server's `retrieve` default.
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..model import check_names

LOGIT_SCALE = 10.0  # logits = LOGIT_SCALE · cos (fixed), the card's "logit scale 1, ×10"
TEMPERATURE = 0.05  # mixture_weights' default, as the server's retrieve
TEXT_MAX_LENGTH = 256  # tokens of a text MiniLM sees (it was trained on up to 256)


# ---- reading adapters ---------------------------------------------------------------------------

def path_order(path: str) -> tuple:
    """Sort key: the path with its numbers compared as numbers (layers.2 before layers.10)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", path)))


def adapter_layers(source) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{layer path: (A (r, in), B (out, r), scale)} in float64, ordered by `path_order`, for an adapter given as a
    PEFT LoRA folder (read without a model) or as (model, adapter name); ΔW = scale·B·A. Read by the merge readers,
    which refuse what has no additive ΔW (DoRA, ...) with the reason."""
    from .layers import folder_layers, model_layers

    if isinstance(source, (str, os.PathLike)):
        layers, _ = folder_layers([source], [1.0])
    elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], nn.Module) \
            and isinstance(source[1], str):
        layers = model_layers(source[0], [source[1]], [1.0])
    else:
        raise ConfigError(f"an adapter is a PEFT LoRA folder or (model, adapter name), got {type(source).__name__}")
    return {p: (layers[p].parts[0].a, layers[p].parts[0].b, layers[p].parts[0].scale)
            for p in sorted(layers, key=path_order)}


def layer_type(path: str) -> str:
    """The module name's last part: model.layers.0.self_attn.q_proj → q_proj."""
    return path.rsplit(".", 1)[-1]


def layout_of(adapters: Sequence[Mapping]) -> tuple[tuple[str, int, int, str], ...]:
    """The (path, d_in, d_out, type) of every layer any of `adapters` has, ordered by `path_order`; refuses adapters
    whose factors of one layer differ in width (adapters of different base models)."""
    _check_list(adapters)
    shapes: dict[str, tuple[int, int]] = {}
    for i, adapter in enumerate(adapters):
        for path, factors in _items(adapter, i):
            a, b, _ = _factors(factors, path, i)
            shape = (a.shape[1], b.shape[0])
            if shapes.setdefault(path, shape) != shape:
                raise ConfigError(f"adapter {i}: layer {path!r} maps {shape[0]} → {shape[1]} features, an earlier "
                                  f"adapter's {shapes[path][0]} → {shapes[path][1]}; adapters of different base "
                                  "models do not share a layout")
    return tuple((p, *shapes[p], layer_type(p)) for p in sorted(shapes, key=path_order))


def _check_list(adapters) -> None:
    if isinstance(adapters, (str, Mapping)) or not isinstance(adapters, Sequence) or not len(adapters):
        raise ConfigError(f"give a non-empty list of adapters ({{path: (A, B, scale)}} each), got {adapters!r:.80}")


def _items(adapter, i: int):
    if not isinstance(adapter, Mapping) or not adapter:
        raise ConfigError(f"adapter {i} must be a non-empty {{path: (A, B, scale)}} mapping (see adapter_layers), "
                          f"got {type(adapter).__name__}")
    return adapter.items()


def _factors(factors, path: str, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    if not isinstance(factors, (tuple, list)) or len(factors) != 3:
        raise ConfigError(f"adapter {i}, layer {path!r}: expected (A, B, scale), got {type(factors).__name__}")
    a, b, s = factors
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2
            and a.shape[0] == b.shape[1] and a.shape[0] > 0):
        raise ConfigError(f"adapter {i}, layer {path!r}: A must be (r, in) and B (out, r) with the same r ≥ 1, got "
                          f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ConfigError(f"adapter {i}, layer {path!r}: scale must be a finite number, got {s!r}")
    return a, b, float(s)


# ---- the weight encoder -------------------------------------------------------------------------

class WeightEncoder(nn.Module):
    """AutoLoRA's encoder of an adapter's weights (see the module docstring). `layout`: the ordered
    (path, d_in, d_out, type) of the layers it reads (`layout_of(adapters)`). `forward(adapters)` → (n, dim), raw;
    `embed(adapters)` → (n, dim) L2-normalised, without gradients, in batches."""

    def __init__(self, layout: Sequence[tuple], dim: int = 384, layers: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        for name, v in (("dim", dim), ("layers", layers), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int ≥ 1, got {v!r}")
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.layout = _check_layout(layout)
        self.dim = dim
        self.index = {path: i for i, (path, *_) in enumerate(self.layout)}
        self.keys = [f"{kind}_{d_out}" for _, _, d_out, kind in self.layout]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.probes = nn.ParameterList(nn.Parameter(torch.randn(d_in) / math.sqrt(d_in))
                                           for _, d_in, _, _ in self.layout)
            self.project = nn.ModuleDict()
            for key, (_, _, d_out, _) in zip(self.keys, self.layout):
                if key not in self.project:
                    self.project[key] = nn.Linear(d_out, dim)
            self.positions = nn.Parameter(torch.randn(len(self.layout), dim) * 0.02)
            block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)

    def checked(self, adapters: Sequence[Mapping]) -> list[dict]:
        """`adapters` checked against the layout and moved to the encoder's dtype and device (detached)."""
        _check_list(adapters)
        ref = self.positions
        out = []
        for i, adapter in enumerate(adapters):
            moved = {}
            for path, factors in _items(adapter, i):
                a, b, s = _factors(factors, path, i)
                if path not in self.index:
                    raise ConfigError(f"adapter {i} has layer {path!r}, which this encoder's layout lacks (it reads "
                                      f"{len(self.layout)} layers, e.g. {self.layout[0][0]!r}); build the encoder "
                                      "from a layout with every layer (layout_of)")
                _, d_in, d_out, _ = self.layout[self.index[path]]
                if a.shape[1] != d_in or b.shape[0] != d_out:
                    raise ConfigError(f"adapter {i}, layer {path!r}: factors map {a.shape[1]} → {b.shape[0]} "
                                      f"features, the layout {d_in} → {d_out}")
                moved[path] = (a.detach().to(ref), b.detach().to(ref), s)
            out.append(moved)
        return out

    def responses(self, adapters: Sequence[Mapping]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer of the layout: (rows, e) — the indices of the adapters that have the layer, ascending, and their
        probe responses e = s·(x Aᵀ)Bᵀ, (len(rows), d_out)."""
        adapters = self.checked(adapters)
        out = []
        for l, (path, _, d_out, _) in enumerate(self.layout):
            x = self.probes[l]
            by_rank: dict[int, list[int]] = {}
            for i, adapter in enumerate(adapters):
                if path in adapter:
                    by_rank.setdefault(adapter[path][0].shape[0], []).append(i)
            rows, parts = [], []
            for group in by_rank.values():
                a = torch.stack([adapters[i][path][0] for i in group])  # (m, r, in)
                b = torch.stack([adapters[i][path][1] for i in group])  # (m, out, r)
                s = torch.tensor([adapters[i][path][2] for i in group], dtype=x.dtype, device=x.device)
                parts.append(s[:, None] * torch.einsum("mor,mr->mo", b, a @ x))
                rows += group
            rows = torch.tensor(rows, dtype=torch.long, device=x.device)
            rows, order = rows.sort()
            out.append((rows, torch.cat(parts)[order] if parts else x.new_zeros(0, d_out)))
        return out

    def forward(self, adapters: Sequence[Mapping]) -> torch.Tensor:
        n = len(adapters) if isinstance(adapters, Sequence) else 0
        tokens, present = [], []
        for l, (rows, e) in enumerate(self.responses(adapters)):
            projected = self.project[self.keys[l]](e)
            tokens.append(projected.new_zeros(n, self.dim).index_copy(0, rows, projected))
            present.append(torch.zeros(n, dtype=torch.bool, device=rows.device).index_fill(0, rows, True))
        h = torch.stack(tokens, 1) + self.positions  # (n, layers, dim)
        present = torch.stack(present, 1)
        h = self.norm(self.transformer(h, src_key_padding_mask=~present))
        keep = present.unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1)

    def embed(self, adapters: Sequence[Mapping], batch: int = 64) -> torch.Tensor:
        """(n, dim) L2-normalised embeddings, in eval mode and without gradients."""
        adapters = self.checked(adapters)
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = torch.cat([self(adapters[i:i + batch]) for i in range(0, len(adapters), batch)])
        finally:
            self.train(was)
        return nn.functional.normalize(out, dim=-1)


def _check_layout(layout) -> tuple[tuple[str, int, int, str], ...]:
    if isinstance(layout, (str, Mapping)) or not isinstance(layout, Sequence) or not layout:
        raise ConfigError(f"layout must be a non-empty list of (path, d_in, d_out, type), got {layout!r:.80}")
    out = []
    for entry in layout:
        ok = isinstance(entry, (tuple, list)) and len(entry) == 4 and isinstance(entry[0], str) \
            and isinstance(entry[3], str) and entry[3] and "." not in entry[3] \
            and all(not isinstance(v, bool) and isinstance(v, int) and v >= 1 for v in entry[1:3])
        if not ok:
            raise ConfigError(f"a layout entry is (path, d_in ≥ 1, d_out ≥ 1, type without dots), got {entry!r}")
        out.append(tuple(entry))
    paths = [e[0] for e in out]
    if len(set(paths)) != len(paths):
        raise ConfigError("a layout lists a layer twice")
    return tuple(out)


# ---- the text side ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _minilm():
    from ..models import load_minilm

    return load_minilm()  # (encoder, tokenizer), frozen, eval


def text_embeddings(texts: Sequence[str] | str) -> torch.Tensor:
    """(N, 384) L2-normalised all-MiniLM-L6-v2 embeddings (mean-pooled over real tokens; frozen; the encoder is
    loaded on the first call, once)."""
    from ..train.baseline import mean_pooled

    texts = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, Sequence) else None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("text_embeddings needs a non-empty list of strings")
    encoder, tokenizer = _minilm()
    with torch.no_grad():
        pooled = mean_pooled(encoder, tokenizer, texts, max_length=TEXT_MAX_LENGTH, progress=False).float()
    return nn.functional.normalize(pooled, dim=-1)


def _embedded(embed: Callable, texts: list[str], what: str) -> torch.Tensor:
    vectors = embed(texts)
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != len(texts):
        raise ConfigError(f"embed must return a ({len(texts)}, dim) tensor for the {what}, got "
                          f"{tuple(getattr(vectors, 'shape', ())) or type(vectors).__name__}")
    return nn.functional.normalize(vectors.detach().float(), dim=-1)


# ---- training -----------------------------------------------------------------------------------

def _positive_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{name} must be an int ≥ {low}, got {v!r}")
    return v


def train_encoder(encoder: WeightEncoder, adapters: Sequence[Mapping], captions: Sequence[Sequence[str]],
                  steps: int, lr: float = 1e-4, batch: int = 32, seed: int = 0,
                  embed: Callable[[list[str]], torch.Tensor] = text_embeddings,
                  logit_scale: float = LOGIT_SCALE) -> list[float]:
    """Fit `encoder` contrastively on `adapters` with known `captions` (a list of captions per adapter, e.g. short,
    medium and long; a bare string is one caption): per step `batch` adapters drawn without replacement, one caption
    each, symmetric InfoNCE over logits = logit_scale·cos. The captions are embedded once with `embed` (frozen; MiniLM
    by default); only the encoder trains (AdamW at `lr`). Returns the loss of every step."""
    adapters = encoder.checked(adapters)
    if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) != len(adapters):
        raise ConfigError(f"give one list of captions per adapter ({len(adapters)}), got {captions!r:.80}")
    lists = [[c] if isinstance(c, str) else list(c) if isinstance(c, Sequence) else [] for c in captions]
    if any(not c or not all(isinstance(t, str) for t in c) for c in lists):
        raise ConfigError("every adapter needs a non-empty list of caption strings")
    if len(adapters) < 2:
        raise ConfigError("contrastive training needs at least 2 adapters (the others are a pair's negatives)")
    _positive_int("steps", steps)
    batch = min(_positive_int("batch", batch, 2), len(adapters))
    for name, v in (("lr", lr), ("logit_scale", logit_scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    texts = sorted({t for c in lists for t in c})
    vectors = _embedded(embed, texts, "captions")
    if vectors.shape[1] != encoder.dim:
        raise ConfigError(f"the captions embed to {vectors.shape[1]} dimensions, the encoder to {encoder.dim}")
    vectors = vectors.to(encoder.positions.device)
    row = {t: i for i, t in enumerate(texts)}
    choices = [torch.tensor([row[t] for t in c]) for c in lists]

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr)
    target = torch.arange(batch, device=vectors.device)
    was = encoder.training
    encoder.train()
    losses = []
    try:
        for _ in range(steps):
            picked = torch.randperm(len(adapters), generator=gen)[:batch].tolist()
            caps = [int(choices[i][torch.randint(len(choices[i]), (1,), generator=gen)]) for i in picked]
            z = nn.functional.normalize(encoder([adapters[i] for i in picked]), dim=-1)
            logits = logit_scale * z @ vectors[caps].T
            loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        encoder.train(was)
    return losses


# ---- retrieval ----------------------------------------------------------------------------------

def retrieve(queries, adapter_embeddings: torch.Tensor, k: int,
             embed: Callable[[list[str]], torch.Tensor] = text_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """The k adapters nearest to each query by cosine: (indices (Q, k), scores (Q, k)), best first. `queries`:
    request texts (embedded with `embed`, MiniLM by default) or their embeddings, (Q, dim) or (dim,)."""
    if not isinstance(adapter_embeddings, torch.Tensor) or adapter_embeddings.dim() != 2 \
            or not adapter_embeddings.shape[0]:
        raise ConfigError("adapter_embeddings must be a non-empty (adapters, dim) tensor, got "
                          f"{tuple(getattr(adapter_embeddings, 'shape', ())) or type(adapter_embeddings).__name__}")
    n = adapter_embeddings.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k must be an int in [1, {n}] (the number of adapters), got {k!r}")
    if isinstance(queries, torch.Tensor):
        q = nn.functional.normalize(queries.detach().float().reshape(-1, queries.shape[-1]), dim=-1)
    else:
        texts = [queries] if isinstance(queries, str) else list(queries) if isinstance(queries, Sequence) else []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError("queries must be a request text, a list of them, or a tensor of their embeddings")
        q = _embedded(embed, texts, "queries")
    keys = nn.functional.normalize(adapter_embeddings.detach().float(), dim=-1)
    if q.shape[1] != keys.shape[1]:
        raise ConfigError(f"queries embed to {q.shape[1]} dimensions, the adapters to {keys.shape[1]}")
    scores, indices = (q.to(keys.device) @ keys.T).topk(k, dim=1)
    return indices, scores


class DescriptionIndex:
    """The baseline retriever: adapters `names` by the embedding of their text `descriptions` (computed once)."""

    def __init__(self, names: Sequence[str], descriptions: Sequence[str],
                 embed: Callable[[list[str]], torch.Tensor] = text_embeddings):
        self.names = check_names(names)
        if isinstance(descriptions, str) or not isinstance(descriptions, Sequence) \
                or len(descriptions) != len(self.names) or not all(isinstance(d, str) for d in descriptions):
            raise ConfigError(f"give one description string per adapter ({len(self.names)})")
        self.embed = embed
        self.embeddings = _embedded(embed, list(descriptions), "descriptions")

    def retrieve(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into `names`, cosine scores), both (Q, k), best first."""
        return retrieve(queries, self.embeddings, k, self.embed)


class WeightIndex:
    """AutoLoRA's retriever: adapters `names` by their `encoder` embeddings (computed once), nothing else needed."""

    def __init__(self, names: Sequence[str], adapters: Sequence[Mapping], encoder: WeightEncoder,
                 embed: Callable[[list[str]], torch.Tensor] = text_embeddings):
        self.names = check_names(names)
        if not isinstance(adapters, Sequence) or len(adapters) != len(self.names):
            raise ConfigError(f"give one adapter per name ({len(self.names)})")
        self.embed = embed
        self.embeddings = encoder.embed(adapters)

    def retrieve(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into `names`, cosine scores), both (Q, k), best first."""
        return retrieve(queries, self.embeddings, k, self.embed)


def mixture_weights(scores: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """softmax(scores / temperature) over the last axis: weights for composing the k retrieved adapters (they sum to
    1 and are ordered as the scores)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or not scores.shape[-1] \
            or not torch.isfinite(scores).all():
        raise ConfigError("scores must be a tensor of finite scores with at least one along its last axis")
    return torch.softmax(scores.detach().double() / temperature, dim=-1).to(torch.float32)
