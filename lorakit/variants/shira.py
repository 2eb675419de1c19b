"""SHiRA — Sparse High-Rank Adapters (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175).

y = W x + ΔW x with ΔW zero except at K fixed entries of W, whose values are the trainable vector
`shira_weight` (K,); the entries are the int32 buffer `shira_indices` (2, K): row (output) and column (input)
index into W seen as an (out, in) matrix, sorted row-major. This is PEFT's SHIRA format (same keys, dtypes and
order), so adapters move between PEFT and lorakit both ways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import AdapterConfig, PEFT_VERSION
from ..errors import ConfigError, MergeError, StateDictError, UnsupportedFeatureError
from ..init import passes, register_init
from ..kinds import LinearKind
from . import register_variant
from .base import Variant

MASK_TYPES = ("random", "struct", "weight_magnitude", "gradient", "snip")
DATA_MASKS = ("gradient", "snip")  # masks computed by `lorakit.initialize(model, "shira", dataloader=...)`
NOT_READY = -1  # index placeholder of a data-driven mask before its initialization pass


@register_variant
class SHiRA(Variant):
    """Sparse high-rank adapter: trainable values at K fixed entries of W (not low-rank: no `factors()`).

    Size: K = r·(m + n) entries on an m×n weight (as many parameters as a rank-r LoRA, PEFT's rule), or
    K = max(1, round(density·m·n)) with option `density`; K must not exceed m·n (PEFT's limit; ConfigError
    naming r / density otherwise). The scale is 1 as in PEFT: `lora_alpha`, `use_rslora` and `alpha_pattern`
    do not apply. Values start at 0 (ΔW = 0); `init_lora_weights=False` draws them N(0, 1) (PEFT's
    `init_weights=False`, for tests).

    Masks (option `mask_type`; the entries are W's (out, in) matrix view, conv kernels flattened):
    - "random" (default): PEFT's mask bit for bit — the first K entries of `torch.randperm(m·n)` drawn from a
      CPU `torch.Generator` seeded with `random_seed` (unseeded: the generator's default seed), every layer
      re-seeded alike.
    - "struct" [U: the paper's exact layout is unverified; this is lorakit's]: the main diagonal
      (min(m, n) entries, or the first K of them) plus whole rows and columns, alternating row, column, row, …
      in the order of `randperm(m)` / `randperm(n)` from the same seeded generator, skipping entries already
      taken; the last row or column taken is filled only up to K (its lowest-index free entries). Diagonal +
      full rows/columns ⇒ ΔW can have full rank.
    - "weight_magnitude": the K largest |W| (W as it is at injection: unmerge other adapters first).
    - "gradient": the K largest Σ_batches |∂L/∂W| on calibration data; "snip": the K largest |W| ⊙ Σ|∂L/∂W|
      (= Σ|W ⊙ ∂L/∂W|, since W is fixed during the pass). These need `lorakit.initialize(model, "shira",
      dataloader=..., name=...)` after injection; until then the adapter refuses forward and merge with a
      ConfigError saying so (no silent fallback mask).
    Ties in top-K masks are broken by `torch.topk`; every mask is stored sorted row-major (as PEFT's).

    Compute: ΔW is scattered into a dense (out, in) matrix each call and applied with one matmul (fused into the
    output with addmm for Linear). Measured on a 384×1536 layer, r = 8 (K = 15,360, 2.6% dense), 1 CPU thread,
    forward+backward: 16 tokens — dense 1.2 ms, torch.sparse.mm 3.1 ms, gather+index_add 1.8 ms; 256 tokens —
    5.0 / 10.1 / 29.6 ms; 2,048 tokens — 33 / 170 / 410 ms. Dense wins from a few tokens on (GEMM beats the
    sparse kernels), and its temporary (m·n) is no larger than the layer's weight. Merge adds ΔW into W (K
    entries change).
    """

    name = "shira"
    peft_type = "SHIRA"
    pair_refusal = "it trains sparse entries of ΔW, not low-rank factors"
    uses_base_out = False

    @dataclass
    class Options:
        mask_type: str = "random"
        random_seed: Optional[int] = None
        density: Optional[float] = None

        def __post_init__(self):
            if self.mask_type not in MASK_TYPES:
                raise ConfigError(f"option mask_type must be one of {list(MASK_TYPES)}, got {self.mask_type!r}")
            if self.random_seed is not None and (isinstance(self.random_seed, bool)
                                                 or not isinstance(self.random_seed, int)):
                raise ConfigError(f"option random_seed must be an int or null, got {self.random_seed!r}")
            if self.density is not None:
                ok = isinstance(self.density, (int, float)) and not isinstance(self.density, bool)
                if not ok or not 0.0 < self.density < 1.0:
                    raise ConfigError(f"option density must be in (0, 1), got {self.density!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, 1.0, dropout, config, **context)
        m, n = kind.out_features, kind.in_features
        if self.opts.density is not None:
            k = max(1, round(self.opts.density * m * n))
        else:
            k = r * (m + n)
            if k > m * n:
                raise ConfigError(f"r={r} gives r·(m+n) = {k} SHiRA values on {self.path or 'a layer'} ({m}×{n}), "
                                  f"more than its {m * n} weights; lower r (or rank_pattern) or set option density")
        self.num_values = k
        self.shira_weight = nn.Parameter(torch.zeros(k))
        self.register_buffer("shira_indices", torch.zeros(2, k, dtype=torch.int32))
        self._ready = False  # cached result of the index check in `check_ready`

    # ---- masks ---------------------------------------------------------------------------------
    def initialize(self, how):
        with torch.no_grad():
            if how is False:
                nn.init.normal_(self.shira_weight)
            else:
                nn.init.zeros_(self.shira_weight)
            if self.opts.mask_type in DATA_MASKS:
                self.shira_indices.fill_(NOT_READY)
                self._ready = False
            else:
                self.set_mask(self.mask())

    def mask(self, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flat indices (row·n + col, sorted) of this layer's mask; `scores` (m, n) for data-driven masks."""
        m, n, k = self.kind.out_features, self.kind.in_features, self.num_values
        kind = self.opts.mask_type
        if kind == "random":
            return torch.randperm(m * n, generator=self._generator())[:k].sort().values
        if kind == "struct":
            return struct_mask(m, n, k, self._generator())
        if kind == "weight_magnitude":
            scores = self.kind.weight().detach().abs()
        elif scores is None:
            raise ConfigError(f"mask_type {kind!r} is computed from data: run lorakit.initialize(model, 'shira', "
                              f"dataloader=..., name=...)")
        return torch.topk(scores.float().flatten(), k).indices.sort().values

    def _generator(self) -> torch.Generator:
        g = torch.Generator()  # CPU, as PEFT's random_mask; unseeded = the generator's default seed
        if self.opts.random_seed is not None:
            g.manual_seed(self.opts.random_seed)
        return g

    @torch.no_grad()
    def set_mask(self, flat: torch.Tensor) -> None:
        """Use the entries `flat` (row·n + col) from now on."""
        n = self.kind.in_features
        flat = flat.to(self.shira_indices.device, torch.int64)
        self.shira_indices.copy_(torch.stack([flat // n, flat % n]).to(torch.int32))
        self._ready = False

    def check_ready(self) -> None:
        """ConfigError while a data-driven mask awaits its pass; StateDictError for indices that do not fit W."""
        if self._ready:
            return
        idx = self.shira_indices
        if bool((idx == NOT_READY).any()):
            raise ConfigError(f"SHiRA adapter on {self.path or 'this layer'} uses mask_type "
                              f"{self.opts.mask_type!r}, which is computed from data: run "
                              f"lorakit.initialize(model, 'shira', dataloader=..., name=...) before using it")
        m, n = self.kind.out_features, self.kind.in_features
        rows, cols = idx[0].long(), idx[1].long()
        if bool((rows < 0).any() | (rows >= m).any() | (cols < 0).any() | (cols >= n).any()):
            raise StateDictError(f"shira_indices of {self.path or 'this layer'} point outside its {m}×{n} weight")
        if torch.unique(rows * n + cols).numel() != rows.numel():
            raise StateDictError(f"shira_indices of {self.path or 'this layer'} repeat an entry")
        self._ready = True

    # ---- math ----------------------------------------------------------------------------------
    def delta_matrix(self) -> torch.Tensor:
        """ΔW as a dense (out, in) matrix, differentiable in `shira_weight`."""
        self.check_ready()
        m, n = self.kind.out_features, self.kind.in_features
        flat = self.shira_indices[0].long() * n + self.shira_indices[1].long()
        return self.shira_weight.new_zeros(m * n).index_put_((flat,), self.shira_weight).view(m, n)

    def delta_weight(self):
        try:
            return self.delta_matrix()
        except ConfigError as e:
            raise MergeError(str(e)) from None

    def _linear(self) -> bool:
        return type(self.kind).down is LinearKind.down

    def delta(self, x, base_out):
        d = self.delta_matrix()
        return self.kind.down(self.dropout(x), self.kind.down_layout(d))

    def plus_delta(self, y, x, base_out):
        d = self.delta_matrix()
        x = self.dropout(x)
        if self._linear() and y.is_contiguous() and y.dtype == x.dtype == d.dtype and y.shape[:-1] == x.shape[:-1]:
            return torch.addmm(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), d.T).view(y.shape)
        return y + self.kind.down(x, self.kind.down_layout(d))

    def add_delta_(self, out, x, base_out):
        d = self.delta_matrix()
        x = self.dropout(x) if self.training else x
        if self._linear() and out.is_contiguous() and out.dtype == x.dtype == d.dtype:
            out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), d.T)
        else:
            out += self.kind.down(x, self.kind.down_layout(d))

    def file_tensors(self):
        return {"shira_weight": self.shira_weight, "shira_indices": self.shira_indices}

    def extra_repr(self):
        return f"K={self.num_values}, mask_type={self.opts.mask_type}"

    # ---- PEFT's SHIRA config format ------------------------------------------------------------
    @classmethod
    def data_init(cls, config, schedule):
        """Runs (`lorakit train`) compute gradient / SNIP masks on their first training batches."""
        return ("shira", {}) if config.options["mask_type"] in DATA_MASKS else None

    @classmethod
    def peft_config(cls, config):
        """PEFT's ShiraConfig dump. Settings PEFT's SHiRA lacks (dropout, layer selection, rank_pattern, option
        density) are written, only when set, under their lorakit names; PEFT ignores them with a warning."""
        opts = config.options
        out = {"auto_mapping": None, "base_model_name_or_path": config.base_model_name_or_path,
               "fan_in_fan_out": config.fan_in_fan_out, "inference_mode": True,
               "init_weights": config.init_lora_weights is not False, "mask_type": opts["mask_type"],
               "modules_to_save": config.modules_to_save, "peft_type": cls.peft_type,
               "peft_version": PEFT_VERSION, "r": config.r, "random_seed": opts["random_seed"],
               "revision": config.revision, "target_modules": config.target_modules, "task_type": config.task_type}
        defaults = AdapterConfig.__dataclass_fields__
        for key in ("lora_dropout", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern"):
            value, field = getattr(config, key), defaults[key]
            default = field.default_factory() if callable(field.default_factory) else field.default
            if value != default:
                out[key] = value
        if opts["density"] is not None:
            out["options"] = {"density": opts["density"]}
        return out

    @classmethod
    def config_from_peft(cls, data):
        data = dict(data)
        data.pop("variant", None)
        options = dict(data.pop("options", None) or {})
        mask_type = data.pop("mask_type", "random")
        if mask_type not in MASK_TYPES:
            raise UnsupportedFeatureError(f"SHiRA mask_type {mask_type!r} (a custom PEFT mask_fn) is not "
                                          f"implemented; lorakit has {list(MASK_TYPES)}")
        options.update(mask_type=mask_type, random_seed=data.pop("random_seed", None))
        data["init_lora_weights"] = data.pop("init_weights", True)
        return {**data, "variant": cls.name, "options": options}


def struct_mask(m: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """SHiRA-Struct as lorakit lays it out (see `SHiRA`): diagonal, then whole rows and columns alternately."""
    taken = torch.zeros(m, n, dtype=torch.bool)
    d = min(m, n, k)
    taken[torch.arange(d), torch.arange(d)] = True
    left = k - d
    rows, cols = torch.randperm(m, generator=generator).tolist(), torch.randperm(n, generator=generator).tolist()
    turn = 0
    while left > 0:
        line = taken[rows.pop(0)] if (turn % 2 == 0 and rows) or not cols else taken[:, cols.pop(0)]
        free = (~line).nonzero().flatten()[:left]
        line[free] = True  # a view of `taken`
        left -= free.numel()
        turn += 1
    return taken.flatten().nonzero().flatten()


@register_init("shira")
def init_shira(run) -> None:
    """Compute the "gradient" / "snip" masks of SHiRA adapter `run.name` from Σ|∂L/∂W| over the run's batches
    (adapters disabled); values are reset to 0, so the adapter starts at ΔW = 0 on its new entries."""
    from ..model import disabled, get_config

    config = get_config(run.model, run.name)
    mask_type = config.options.get("mask_type") if config.variant == SHiRA.name else None
    if mask_type not in DATA_MASKS:
        raise ConfigError(f"initialization 'shira' computes SHiRA mask_type {list(DATA_MASKS)} from data; adapter "
                          f"{run.name!r} is {config.variant!r}" + (f" with mask_type {mask_type!r}, set at "
                                                                    f"injection" if mask_type else ""))
    layers = passes.adapted_layers(run.model, run.name)
    merged = [p for p, layer in layers.items() if run.name in layer.merged]
    if merged:
        raise MergeError(f"adapter {run.name!r} is merged into {merged[:3]}; unmerge it before re-initializing")
    grads = passes.weight_gradients(run, f"shira {mask_type}", absolute=True)
    with disabled(run.model):  # the base weights, without any merged adapter
        for path, layer in layers.items():
            scores = grads[path]
            if mask_type == "snip":  # Σ|W ⊙ g| = |W| ⊙ Σ|g|: W is fixed during the pass
                scores = scores * layer.kind.weight().detach().abs().float()
            variant = layer.adapters[run.name]
            variant.set_mask(variant.mask(scores))
            with torch.no_grad():
                variant.shira_weight.zero_()
    del grads


__all__ = ["SHiRA", "struct_mask", "MASK_TYPES"]
