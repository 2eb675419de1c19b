"""The variant contract: one class per method, owning its parameters for one adapted layer."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedFeatureError


class Site(NamedTuple):
    """One layer an adapter will sit on: its module path, kind, rank and scale."""

    path: str
    kind: Any
    r: int
    scale: float


class TrainedPair(NamedTuple):
    """Two trainable factors through which a training step moves ΔW:
    ΔW = (constant) + scale·B[:, ranks]·diag(weights)·A[ranks], A (r, in) and B (out, r) as `kind.matrix` views.

    `ranks`: the components this step trains (all, or DyLoRA's one); `weights`: a fixed diagonal between the
    factors (MatryoshkaLoRA's P), None for the identity. Closed-form optimizers (LoRA-Pro) work on this form.
    """

    a: nn.Parameter
    b: nn.Parameter
    scale: float
    ranks: slice = slice(None)
    weights: Optional[torch.Tensor] = None


class Shared(nn.Module):
    """Model-wide state of one adapter (a shared basis, bank, vector or hypernetwork), built once per adapter
    by `Variant.build_shared` and referenced by every layer's variant; lives at `model.lorakit_shared[name]`.

    `file_tensors` keys are saved as `base_model.<key>` (PEFT's place for model-wide tensors such as VeRA's
    `vera_A`). Frozen tensors are buffers, trainable ones parameters.
    """

    def initialize(self, how) -> None:
        """Set initial values of trainable state (`how` is `init_lora_weights`)."""

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {}


class Variant(nn.Module):
    """One adapter's parameters and math on one layer.

    `kind` (see `lorakit.kinds`) hides the module type: a variant computes with `kind.down`,
    `kind.up`, `kind.weight()` and never asks whether it sits on a Linear, Conv or Embedding.

    Subclasses set `name` (registry key) and `peft_type` ("LORA" when PEFT's LoRA can read the file;
    a PEFT tuner's own type when PEFT has the method; anything else makes PEFT refuse it), create
    parameters in `__init__` in their file shapes (contents may be garbage until `initialize` or a
    load fills them), and implement `delta`. Trainable tensors are `nn.Parameter`s, frozen ones buffers.
    Method options (`AdapterConfig.options`) are declared as a dataclass in `Options`.
    """

    name: ClassVar[str]
    peft_type: ClassVar[str] = "LORA"
    mergeable: ClassVar[bool] = True
    reads_base_weight: ClassVar[bool] = False  # True when the output depends on W (cannot run on a merged W)
    uses_base_out: ClassVar[bool] = True  # False when `delta` ignores `base_out` (saves gathering it)
    reads_routing: ClassVar[bool] = False  # True when it reads per-token routing (`bind_routing`, see lorakit.routing)
    Options: ClassVar[Optional[type]] = None  # a dataclass of method options; __post_init__ validates values

    def __init__(self, kind, r: int, scale: float, dropout: float, config, shared: Optional[Shared] = None,
                 path: str = ""):
        super().__init__()
        self.kind, self.r, self.scale, self.config, self.path = kind, r, scale, config, path
        self.opts = self.parse_options(config.options)
        object.__setattr__(self, "shared", shared)  # referenced, not owned: saved and moved once, by the model
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind.takes_dropout else nn.Identity()

    # ---- options, shared state and config files (class level) --------------------------------
    @classmethod
    def parse_options(cls, options: dict) -> Any:
        """`options` as an `Options` instance; ConfigError naming any unknown or invalid option."""
        if cls.Options is None:
            if options:
                raise ConfigError(f"variant {cls.name!r} takes no options, got {sorted(options)}")
            return None
        valid = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for variant {cls.name!r}; valid options: {valid}")
        try:
            return cls.Options(**options)
        except TypeError as e:
            raise ConfigError(f"invalid options for variant {cls.name!r}: {e}") from None

    @classmethod
    def build_shared(cls, config, sites: list[Site]) -> Optional[Shared]:
        """The adapter's model-wide state for these layers, or None (most variants have none)."""
        return None

    @classmethod
    def data_init(cls, config, schedule: dict) -> Optional[tuple[str, dict]]:
        """(method, options) of the `lorakit.initialize` pass this config needs before training (e.g. LoRA-SB's),
        or None. `schedule`: the run's `learning_rate`, `total_steps` and `warmup_steps`."""
        return None

    @classmethod
    def peft_config(cls, config) -> Optional[dict]:
        """The `adapter_config.json` dict in a PEFT tuner's own format, or None for the LoRA-style dump."""
        return None

    @classmethod
    def config_from_peft(cls, data: dict) -> dict:
        """`AdapterConfig` keys from a config file of this variant's `peft_type` (inverse of `peft_config`)."""
        return data

    @classmethod
    def canonical_file_tensors(cls, config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors (keys as `adapter_parameters` gives them) in this variant's own keys; default unchanged.
        E.g. RandLoRA drops the per-layer copies of its shared bases that PEFT writes, after checking them."""
        return tensors

    # ---- per layer -----------------------------------------------------------------------------
    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to before this adapter runs."""
        owners = [self] + ([self.shared] if self.shared is not None else [])
        for owner in owners:
            for t in (*owner.parameters(), *owner.buffers()):
                if t.is_floating_point():
                    return t.dtype
        return torch.get_default_dtype()

    def initialize(self, how) -> None:
        """Set initial values (`how` is `init_lora_weights`)."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """This adapter's change to the output for the rows of `x` (`base_out` = base layer's output)."""
        raise NotImplementedError

    def plus_delta(self, y: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """`y + delta(x, base_out)` out of place, with autograd (training); variants may fuse the add."""
        return y + self.delta(x, base_out)

    def add_delta_(self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor) -> None:
        """`out += delta(x, base_out)` in place, for inference (no autograd); variants may fuse it."""
        out += self.delta(x, base_out)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved for this layer, by key suffix (e.g. "lora_A.weight"); live parameters."""
        raise NotImplementedError

    # ---- merging: the effective weight is row_scale ⊙ (W + delta_weight) --------------------
    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW as an (out, in) matrix, before any row scale (default: from `factors`)."""
        factors = self.factors()
        if factors is None:
            raise NotImplementedError
        a, b, s = factors
        return (b @ a) * s

    def row_scale(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-output-row factor applied after adding ΔW to the unmerged `weight`; None means 1."""
        return None

    def factors(self) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """(A, B, scale) as (r, in) and (out, r) matrices when ΔW = scale·B·A exactly, else None.

        Merging, exporting as a plain LoRA, squeezing and batched serving use this form.
        """
        return None

    # ---- the factored training form, for closed-form optimizers -----------------------------
    pair_refusal: ClassVar[str] = "its ΔW is not s·B·A of two trainable factors"

    def trained_pairs(self) -> list[TrainedPair]:
        """The (A, B) pairs the current training step moves (see `TrainedPair`); UnsupportedFeatureError naming
        `pair_refusal` when ΔW does not take that form."""
        raise UnsupportedFeatureError(f"variant {self.name!r}: {self.pair_refusal}")

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


class LowRankVariant(Variant):
    """A variant whose ΔW = s·B·A is built from its own tensors: subclasses implement `factors` (differentiable)
    and `file_tensors`; the forward, in-place inference add and dense ΔW follow from it."""

    uses_base_out = False

    def layouts(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """`factors()` in the layer's own layouts for `kind.down` / `kind.up` (conv kernels for conv layers)."""
        a, b, s = self.factors()
        return self.kind.down_layout(a), self.kind.up_layout(b), s

    def delta(self, x, base_out):
        a, b, s = self.layouts()
        return self.kind.up(self.kind.down(self.dropout(x), a) * s, b)

    def add_delta_(self, out, x, base_out):
        a, b, s = self.layouts()
        h = self.kind.down(self.dropout(x) if self.training else x, a)
        self.kind.add_up_(out, h.mul_(s), b)

    def factors(self):
        raise NotImplementedError
