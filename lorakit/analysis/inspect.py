"""`lorakit inspect`: what a saved adapter holds, layer by layer (read from the files, no model needed)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import name_matches
from ..io import read_adapter
from ..model import SHARED_KEY

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<part>lora_A|lora_B|lora_magnitude_vector|"
                  r"lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def layer_table(directory: str | Path) -> tuple[object, list[dict], list[tuple[str, int]]]:
    """(config, one row per adapted layer, [(other tensor key, numel)] such as saved heads and model-wide state).

    LoRA/DoRA files get rank, shape, norms and ‖s·B·A‖ per layer; other variants' files list each layer's tensors
    (their ΔW may depend on the base weights or on model-wide state, which inspect does not load).
    """
    config, tensors = read_adapter(directory)
    if config.variant not in ("lora", "dora"):
        return (config, *_variant_rows(config, tensors))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, t in sorted(tensors.items()):
        m = _KEY.match(key)
        if m:
            layers.setdefault(m["path"], {})[m["part"].replace("embedding_", "")] = t
        else:
            others.append((key, t.numel()))
    rows = []
    for path, parts in layers.items():
        a, b = parts["lora_A"].float().flatten(1), parts["lora_B"].float().flatten(1)
        if a.shape[0] != b.shape[1]:  # embedding files store A as (r, num_embeddings), B as (dim, r)
            a = a.T
        scale = config.scale_for(path)
        # ‖s·B·A‖_F² = s² · trace((BᵀB)(AAᵀ)), without forming B·A
        delta = scale * torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0)).item()
        row = {"layer": path, "rank": b.shape[1], "shape": f"{b.shape[0]}x{a.shape[1]}",
               "params": sum(t.numel() for t in parts.values()), "scale": scale,
               "norm_A": a.norm().item(), "norm_B": b.norm().item(), "norm_delta": delta}
        if "lora_magnitude_vector" in parts:
            row["magnitude_mean"] = parts["lora_magnitude_vector"].float().mean().item()
        rows.append(row)
    return config, rows, others


def _variant_rows(config, tensors: dict[str, torch.Tensor]) -> tuple[list[dict], list[tuple[str, int]]]:
    """Rows for any variant: a key belongs to the layer named by its longest prefix that the targets match."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, t in sorted(tensors.items()):
        parts = key.split(".")
        path = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)
                     if not key.startswith(SHARED_KEY) and name_matches(config.target_modules, ".".join(parts[:k]))),
                    None)
        if path is None:
            others.append((key, t.numel()))
        else:
            layers.setdefault(path, {})[key[len(path) + 1:]] = t
    rows = [{"layer": path, "params": sum(t.numel() for t in held.values() if t.is_floating_point()),
             "tensors": ", ".join(f"{k} {tuple(t.shape)}" for k, t in held.items())} for path, held in layers.items()]
    return rows, others


def describe_adapter(directory: str | Path) -> str:
    """A readable report: config summary, a table of layers, totals."""
    config, rows, others = layer_table(directory)
    lines = [f"adapter: {directory}",
             f"variant={config.variant} r={config.r} lora_alpha={config.lora_alpha} use_rslora={config.use_rslora} "
             f"dropout={config.lora_dropout} task_type={config.task_type}",
             f"target_modules={config.target_modules} modules_to_save={config.modules_to_save}",
             f"base_model={config.base_model_name_or_path}", ""]
    if config.variant not in ("lora", "dora"):
        lines.append(f"options={config.options}")
        lines += [f"{r['layer']}: {r['params']:,} stored values — {r['tensors']}" for r in rows]
        rows = [{**r, "rank": config.rank_for(r["layer"])} for r in rows]
        return "\n".join(lines + _totals(rows, others, "stored adapter values (trainable and frozen)"))
    has_mag = any("magnitude_mean" in r for r in rows)
    header = f"{'layer':<56} {'rank':>4} {'shape':>11} {'params':>9} {'scale':>7} {'|A|':>8} {'|B|':>8} {'|sBA|':>8}"
    lines.append(header + ("  mean m" if has_mag else ""))
    for r in rows:
        line = (f"{r['layer'][-56:]:<56} {r['rank']:>4} {r['shape']:>11} {r['params']:>9,} {r['scale']:>7.3g} "
                f"{r['norm_A']:>8.3g} {r['norm_B']:>8.3g} {r['norm_delta']:>8.3g}")
        lines.append(line + (f"  {r['magnitude_mean']:.3g}" if "magnitude_mean" in r else ""))
    return "\n".join(lines + _totals(rows, others))


def _totals(rows: list[dict], others: list[tuple[str, int]], noun: str = "adapter parameters") -> list[str]:
    adapter_params = sum(r["params"] for r in rows)
    other_params = sum(n for _, n in others)
    ranks = sorted({r["rank"] for r in rows})
    lines = ["", f"{len(rows)} adapted layers, ranks {ranks}, {adapter_params:,} {noun}"]
    if others:
        lines.append(f"{len(others)} other tensors (saved modules such as heads, model-wide state), "
                     f"{other_params:,} parameters: " + ", ".join(k for k, _ in others[:4])
                     + (" ..." if len(others) > 4 else ""))
    lines.append(f"total {adapter_params + other_params:,} parameters")
    return lines
