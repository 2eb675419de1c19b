"""Spectra of adapters' weight changes, layer by layer, and their roll-ups.

A LoRA layer's ΔW = s·B·A is decomposed from the factors (QR of B and Aᵀ, SVD of the r×r core:
`lorakit.rank.squeeze.factor_svd`), never as the dense (out, in) matrix; a variant without that form is decomposed
from its dense effective ΔW on the model (`model_spectra`). Per layer:

- `singular_values` of the scaled ΔW, `spectral_norm` σ₁ and `frobenius_norm` (√Σσ², exact from the factors);
- `effective_rank`: exp of the entropy of σ/Σσ (Roy & Vetterli 2007): r for a flat spectrum, 1 for one direction;
- `stable_rank`: Σσ²/σ₁² (≤ rank, insensitive to tiny singular values);
- `energy`: the share of Σσ² kept by the leading k directions, for k in ENERGY_AT (what truncating to k keeps).

A zero ΔW (B = 0: an untrained adapter) has all of these 0.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from ..config import pattern_key
from ..rank.squeeze import SVD, factor_svd, folder_factors, layer_svd

ENERGY_AT = (1, 2, 4, 8, 16, 32, 64)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def spectrum_stats(sigma: torch.Tensor, total: float | None = None) -> dict:
    """The statistics above from singular values (descending) and, optionally, the exact Σσ² (`total`)."""
    s = sigma.detach().double().cpu()
    sq = s.pow(2)
    total = float(sq.sum()) if total is None else float(total)
    top = float(s[0]) if len(s) else 0.0
    if top <= 0 or total <= 0:
        return {"singular_values": [0.0] * len(s), "spectral_norm": 0.0, "frobenius_norm": 0.0,
                "effective_rank": 0.0, "stable_rank": 0.0, "energy": {}}
    p = s[s > 0] / s.sum()
    kept = torch.cumsum(sq, 0) / total
    return {"singular_values": s.tolist(), "spectral_norm": top, "frobenius_norm": math.sqrt(total),
            "effective_rank": math.exp(float(-(p * p.log()).sum())), "stable_rank": total / top ** 2,
            "energy": {k: min(1.0, float(kept[k - 1])) for k in ENERGY_AT if k <= len(s)}}


def svd_record(svd: SVD, rank: int, scale: float, shape: tuple, source: str = "factors") -> dict:
    return {"rank": rank, "scale": scale, "shape": list(shape), "source": source,
            **spectrum_stats(svd.s, svd.total)}


def folder_spectra(directory: str | Path) -> tuple[object, dict[str, dict], list[str]]:
    """(config, {module path: record}, warnings) of a LoRA folder, from its files alone (no base model).

    DoRA folders get the spectra of s·B·A (the direction update): their magnitude vector rescales rows of W₀ + ΔW,
    which needs the base (`model_spectra`)."""
    from ..io import read_adapter

    config, tensors = read_adapter(directory)
    layers = {}
    for path, a, b, _, _ in folder_factors(config, tensors):
        scale = config.scale_for(path)
        svd = factor_svd(a.float(), b.float(), scale)
        layers[path] = svd_record(svd, a.shape[0], scale, (b.shape[0], a.shape[1]))
    return config, layers, folder_warnings(directory, config, tensors, layers)


def model_spectra(model: torch.nn.Module, name: str = "default", progress: bool = False) -> dict[str, dict]:
    """{module path: record} of adapter `name` on its model, any mergeable variant: from `factors()` when ΔW = s·B·A,
    else from the dense effective ΔW (`source: "dense"`, e.g. DoRA with its magnitude applied)."""
    from tqdm.auto import tqdm

    layers = adapted_layers(model, name)
    out = {}
    for path, layer in tqdm(layers, desc="spectra", unit="layer", disable=not progress, leave=False):
        variant = layer.adapters[name]
        svd, source, _ = layer_svd(variant, layer.kind)
        shape = (layer.kind.out_features, layer.kind.in_features)
        out[path] = svd_record(svd, variant.r, float(variant.scale), shape, source)
    return out


def adapted_layers(model: torch.nn.Module, name: str) -> list[tuple[str, object]]:
    """[(path, AdaptedLayer)] holding adapter `name`, in module order."""
    from ..layers import AdaptedLayer
    from ..model import wrappers

    return [(p, w) for p, w in wrappers(model) if isinstance(w, AdaptedLayer) and name in w.adapters]


def block_of(path: str) -> str:
    """"layers.N" for a module inside the N-th block (Llama `layers`, BERT `layer`, GPT-2 `h`, ...), else "other"."""
    m = _BLOCK.search(path)
    return f"layers.{int(m[1])}" if m else "other"


def rollup(layers: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per block and per module type (the path's last part, e.g. q_proj): layer count, total Frobenius norm
    (√Σ‖ΔW‖²), largest spectral norm, mean effective and stable rank."""
    def summary(rows: list[dict]) -> dict:
        return {"layers": len(rows), "frobenius_norm": math.sqrt(sum(r["frobenius_norm"] ** 2 for r in rows)),
                "spectral_norm": max(r["spectral_norm"] for r in rows),
                "effective_rank": sum(r["effective_rank"] for r in rows) / len(rows),
                "stable_rank": sum(r["stable_rank"] for r in rows) / len(rows)}
    groups: dict[str, dict[str, list]] = {"blocks": {}, "modules": {}}
    for path, row in layers.items():
        groups["blocks"].setdefault(block_of(path), []).append(row)
        groups["modules"].setdefault(path.rsplit(".", 1)[-1], []).append(row)
    order = {"blocks": lambda k: (k == "other", int(k.split(".")[1]) if k != "other" else 0), "modules": str}
    return {kind: {k: summary(rows[k]) for k in sorted(rows, key=order[kind])} for kind, rows in groups.items()}


def folder_warnings(directory: str | Path, config, tensors: dict, layers: dict[str, dict]) -> list[str]:
    """What a user should know before trusting or serving the folder: a config without `lora_alpha` (PEFT then
    assumes 8), mixed ranks, pattern keys that match no layer, all-zero ΔW layers, non-finite values."""
    out = []
    raw = json.loads((Path(directory) / "adapter_config.json").read_text()) if Path(directory).is_dir() else {}
    if raw and "lora_alpha" not in raw:
        out.append("adapter_config.json has no lora_alpha: PEFT and lorakit assume 8, so each layer's scale is 8/r "
                   "(8/√r with rsLoRA); check that this is what the adapter was trained with")
    ranks = Counter(r["rank"] for r in layers.values())
    if len(ranks) > 1:
        out.append("mixed ranks: " + ", ".join(f"{n} layers at r={k}" for k, n in sorted(ranks.items()))
                   + f" (servers size their buffers for the largest, r={max(ranks)})")
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field, None) or {}:
            if not any(pattern_key({key: 0}, path) for path in layers):
                out.append(f"{field} key {key!r} matches no adapted layer")
    zero = [p for p, r in layers.items() if r["frobenius_norm"] == 0]
    if zero:
        out.append(f"{len(zero)} of {len(layers)} layers have ΔW = 0 (B is all zero: untrained?), e.g. {zero[0]}")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        out.append(f"{len(bad)} tensors hold NaN or inf values, e.g. {bad[0]}")
    return out
