"""One adapter as one flat, standardised vector, and back exactly: the representation adapter generators share.

`Layout.of(config, tensors)` fixes the order (keys sorted), shapes, dtypes, and each adapted layer's rank and scale
(from the config); `layout.raw(tensors)` concatenates the tensors into one float64 vector, `layout.tensors(raw)`
splits it again in the original dtypes. `Standardiser` keeps one (mean, std) per tensor: `own(layout, raw)` those
of one adapter (ICM-LoRA's per-checkpoint standardisation), `pooled(layout, raws)` those of a whole training set (so
a generator's output de-standardises without a reference adapter). `flatten(folder)` / `unflatten(flat, folder)`
tie them to adapter folders.

Exactness: the raw vector holds float32 / bf16 / fp16 values exactly in float64, and standardising then
de-standardising in float64 moves a value by a few float64 ulps, far below half a float32 ulp, so the round trip
folder → vector → folder gives back every tensor bit for bit (tested). A std of 0 (an all-equal tensor, e.g. B = 0 at
initialisation) is stored as 1.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from ..config import AdapterConfig
from ..errors import ConfigError

LORA_A = re.compile(r"^(.*)\.lora_A\.weight$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each tensor sits in the flat vector: `keys` (sorted), `shapes`, `dtypes` (names), and per adapted layer
    its `ranks` and `scales` (α/r or α/√r, from `config`, a dict of the adapter's config)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    ranks: dict
    scales: dict
    config: dict

    @classmethod
    def of(cls, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> "Layout":
        keys = tuple(sorted(tensors))
        if not keys:
            raise ConfigError("an adapter without tensors has no flat form")
        if any(not tensors[k].is_floating_point() for k in keys):
            raise ConfigError("only floating-point adapter tensors can be flattened "
                              f"({[k for k in keys if not tensors[k].is_floating_point()][:3]} are not)")
        ranks, scales = {}, {}
        for key in keys:
            m = LORA_A.match(key)
            if m:
                ranks[m[1]] = int(tensors[key].shape[0])
                scales[m[1]] = float(config.scale_for(m[1]))
        return cls(keys, tuple(tuple(tensors[k].shape) for k in keys), tuple(str(tensors[k].dtype) for k in keys),
                   ranks, scales, config.to_dict())

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def size(self) -> int:
        """Values in the flat vector."""
        return sum(self.sizes)

    def matches(self, other: "Layout") -> bool:
        """Same tensors, shapes, ranks and scales (dtypes may differ): vectors of the two are comparable."""
        return (self.keys, self.shapes, self.ranks, self.scales) == (other.keys, other.shapes, other.ranks,
                                                                      other.scales)

    def raw(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensors (keyed as this layout) as one float64 vector, in layout order."""
        if set(tensors) != set(self.keys):
            missing, extra = sorted(set(self.keys) - set(tensors)), sorted(set(tensors) - set(self.keys))
            raise ConfigError(f"the tensors do not fit this layout: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, shape in zip(self.keys, self.shapes):
            if tuple(tensors[key].shape) != shape:
                raise ConfigError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, the layout {shape}")
        return torch.cat([tensors[k].detach().reshape(-1).to("cpu", torch.float64) for k in self.keys])

    def tensors(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a raw vector back into tensors of the layout's shapes and dtypes."""
        self._check(raw)
        parts = torch.split(raw.detach().to("cpu", torch.float64), self.sizes)
        return {k: p.reshape(s).to(getattr(torch, d.removeprefix("torch.")))
                for k, p, s, d in zip(self.keys, parts, self.shapes, self.dtypes)}

    def segments(self) -> torch.Tensor:
        """(size,) long: the index of the tensor each value belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.keys)), torch.tensor(self.sizes))

    def _check(self, vector: torch.Tensor) -> None:
        if vector.dim() != 1 or vector.numel() != self.size:
            raise ConfigError(f"a flat vector of this layout has {self.size} values, got shape {tuple(vector.shape)}")


@dataclasses.dataclass(frozen=True)
class Standardiser:
    """One (mean, std) per tensor of `layout`: z = (raw − mean) / std, per tensor, in float64."""

    layout: Layout
    mean: torch.Tensor  # (tensors,) float64
    std: torch.Tensor

    @classmethod
    def own(cls, layout: Layout, raw: torch.Tensor) -> "Standardiser":
        """The adapter's own per-tensor statistics (ICM-LoRA's standardisation)."""
        return cls.pooled(layout, raw[None])

    @classmethod
    def pooled(cls, layout: Layout, raws: torch.Tensor) -> "Standardiser":
        """Per-tensor statistics over every value of that tensor in all the adapters `raws` (n, size)."""
        if raws.dim() != 2 or raws.shape[1] != layout.size or raws.shape[0] < 1:
            raise ConfigError(f"pooled statistics need raw vectors (n ≥ 1, {layout.size}), got {tuple(raws.shape)}")
        parts = torch.split(raws.to(torch.float64), layout.sizes, dim=1)
        mean = torch.stack([p.mean() for p in parts])
        std = torch.stack([p.std(correction=0) for p in parts])
        return cls(layout, mean, torch.where(std > 0, std, torch.ones_like(std)))

    def _expand(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device)[self.layout.segments().to(like.device)]

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.to(torch.float64)
        return (raw - self._expand(self.mean, raw)) / self._expand(self.std, raw)

    def restore(self, z: torch.Tensor) -> torch.Tensor:
        """The raw vector(s) of standardised `z` (..., size), in float64."""
        z = z.to(torch.float64)
        return z * self._expand(self.std, z) + self._expand(self.mean, z)


@dataclasses.dataclass(frozen=True)
class FlatAdapter:
    """An adapter as a standardised float64 `vector` with its `standardiser` (which holds its layout)."""

    vector: torch.Tensor
    standardiser: Standardiser

    @property
    def layout(self) -> Layout:
        return self.standardiser.layout

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.layout.tensors(self.standardiser.restore(self.vector))


def read(folder: str | os.PathLike) -> tuple[Layout, torch.Tensor]:
    """(layout, raw vector) of an adapter folder."""
    from ..io.files import read_adapter

    config, tensors = read_adapter(folder)
    layout = Layout.of(config, tensors)
    return layout, layout.raw(tensors)


def flatten(folder: str | os.PathLike, standardiser: Standardiser | None = None) -> FlatAdapter:
    """An adapter folder as a FlatAdapter, standardised by `standardiser` (default: the adapter's own statistics);
    ConfigError when the folder's layout differs from the standardiser's."""
    layout, raw = read(folder)
    if standardiser is None:
        standardiser = Standardiser.own(layout, raw)
    elif not standardiser.layout.matches(layout):
        raise ConfigError(f"{folder}: its tensors, ranks or scales differ from the standardiser's layout")
    return FlatAdapter(standardiser.standardise(raw), standardiser)


def stack(folders: Sequence[str | os.PathLike]) -> tuple[Layout, torch.Tensor]:
    """(layout, raw vectors (n, size)) of adapter folders that share one layout (ConfigError otherwise)."""
    read_all = [read(f) for f in folders]
    if not read_all:
        raise ConfigError("stack needs at least one adapter folder")
    layout = read_all[0][0]
    for folder, (other, _) in zip(folders, read_all):
        if not layout.matches(other):
            raise ConfigError(f"{folder}: its tensors, ranks or scales differ from {folders[0]}'s")
    return layout, torch.stack([raw for _, raw in read_all])


def unflatten(flat: FlatAdapter, directory: str | os.PathLike) -> Path:
    """Write `flat` as an adapter folder (the layout's config, its tensors de-standardised)."""
    from ..io.files import write_folder

    return Path(write_folder(directory, AdapterConfig.from_dict(flat.layout.config), flat.tensors()))
