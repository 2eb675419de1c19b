"""The variant contract: one class per method, owning its parameters for one adapted layer."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn


class Variant(nn.Module):
    """One adapter's parameters and math on one layer.

    `kind` (see `lorakit.kinds`) hides the module type: a variant computes with `kind.down`,
    `kind.up`, `kind.weight()` and never asks whether it sits on a Linear, Conv or Embedding.

    Subclasses set `name` (registry key) and `peft_type` ("LORA" when PEFT can read the file,
    anything else makes PEFT refuse it), create parameters in `__init__` in their file shapes
    (contents may be garbage until `initialize` or a load fills them), and implement `delta`.
    """

    name: ClassVar[str]
    peft_type: ClassVar[str] = "LORA"
    mergeable: ClassVar[bool] = True
    reads_base_weight: ClassVar[bool] = False  # True when the output depends on W (cannot run on a merged W)
    uses_base_out: ClassVar[bool] = True  # False when `delta` ignores `base_out` (saves gathering it)

    def __init__(self, kind, r: int, scale: float, dropout: float, config):
        super().__init__()
        self.kind, self.r, self.scale, self.config = kind, r, scale, config
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind.takes_dropout else nn.Identity()

    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to before this adapter runs."""
        return next(self.parameters()).dtype

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
        """Dense ΔW as an (out, in) matrix, before any row scale."""
        raise NotImplementedError

    def row_scale(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-output-row factor applied after adding ΔW to the unmerged `weight`; None means 1."""
        return None

    def factors(self) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """(A, B, scale) as (r, in) and (out, r) matrices when ΔW = scale·B·A exactly, else None."""
        return None

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"
