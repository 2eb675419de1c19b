"""`lorakit inspect ADAPTER [--base MODEL] [--against OTHER ...] [--report OUT]`: one analysis, three views.

`analyse` gathers, for one adapter: per-layer spectra (`spectra`), with a base model the intruder dimensions and the
spectra of W₀ + ΔW (`intruders`), against other adapters the interference (`interference`), roll-ups per block and
module type, and the folder's warnings. `write_report` turns it into OUT/report.json (one entry per adapted module
path under "layers"), OUT/report.md, OUT/report.html and the PNG plots they show (matplotlib, the `plot` extra);
the page references nothing outside OUT.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError
from .spectra import block_of

PLOTS = {"spectra": "Singular values of each layer's scaled ΔW",
         "norms": "‖ΔW‖_F per block and module type",
         "ranks": "Effective and stable rank per layer",
         "intruders": "Intruder dimensions per layer (k = {k}, ε = {epsilon}) and their count against ε",
         "interference": "Interference with the other adapters, per layer"}


def analyse(adapter_dir: str | Path, model=None, base: Optional[str] = None, against: Sequence[str | Path] = (),
            k: int = 10, epsilon: float = 0.5, cache: Optional[str | Path] = None, progress: bool = True) -> dict:
    """The analysis of one adapter folder as a dict (see the module docstring). `model`: its base model with the
    adapter loaded as "default" (`lorakit.from_pretrained(adapter_dir, base=...)`), for the effective ΔW of any
    variant, intruder dimensions and W₀ + ΔW spectra; `base`: that model's name in the report; `cache`: where base
    SVDs are kept (default `svd_cache_dir()`)."""
    from ..io import read_adapter
    from .intruders import adapter_intruders, svd_cache_dir
    from .spectra import folder_spectra, model_spectra, rollup

    adapter_dir = Path(adapter_dir)
    config, _ = read_adapter(adapter_dir)
    plain = config.variant in ("lora", "dora")
    if not plain and model is None:
        raise ConfigError(f"{adapter_dir}: the spectra of a {config.variant!r} adapter need its base model "
                          f"(ΔW is built from shared or base-dependent tensors); pass --base MODEL")
    warnings, layers = [], {}
    if plain:
        _, layers, warnings = folder_spectra(adapter_dir)
    result = {"adapter": str(adapter_dir), "config": _config_summary(config), "k": k, "epsilon": epsilon}
    if model is not None:
        layers = model_spectra(model, progress=progress)  # the effective ΔW (DoRA's magnitude included)
        found = adapter_intruders(model, k=k, epsilon=epsilon, cache=cache or svd_cache_dir(), progress=progress)
        for path, row in found.items():
            layers[path].update({"intruders": row["intruders"], "intruder_sweep": row["sweep"],
                                 "intruder_cos": row["cos"], "weight_stable_rank": row["stable_rank"],
                                 "weight_stable_rank_base": row["stable_rank_base"], "alpha": row["alpha"],
                                 "alpha_base": row["alpha_base"]})
        result["base"] = base or config.base_model_name_or_path or "given model"
    result.update(layers=layers, warnings=warnings, rollup=rollup(layers) if layers else {})
    if against:
        from .interference import interference

        result["interference"] = []
        for other in against:
            pair = interference({"this": adapter_dir, "other": other})["pairs"][0]
            result["interference"].append({"other": str(other), "summary": pair["summary"], "layers": pair["layers"]})
    return result


def _config_summary(config) -> dict:
    return {"variant": config.variant, "r": config.r, "lora_alpha": config.lora_alpha,
            "use_rslora": config.use_rslora, "use_dora": config.use_dora, "target_modules": config.target_modules,
            "base_model_name_or_path": config.base_model_name_or_path, "task_type": config.task_type}


# ---- tables ---------------------------------------------------------------------------------------------------------
def _num(x) -> str:
    if isinstance(x, int):
        return str(x)
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table the report shows."""
    out = []
    has_base = "base" in result
    header = ["layer", "rank", "scale", "‖ΔW‖_F", "σ₁", "effective rank", "stable rank", "energy at r/2"]
    if has_base:
        header += [f"intruders (ε {result['epsilon']})", "α (W₀)", "α (W₀+ΔW)"]
    rows = []
    for path, r in result["layers"].items():
        half = r["energy"].get(max(1, r["rank"] // 2)) if r["energy"] else None
        row = [path, _num(r["rank"]), _num(r["scale"]), _num(r["frobenius_norm"]), _num(r["spectral_norm"]),
               _num(r["effective_rank"]), _num(r["stable_rank"]), _num(half)]
        if has_base:
            row += [_num(r["intruders"]), _num(r["alpha_base"]), _num(r["alpha"])]
        rows.append(row)
    for kind, title in (("blocks", "Per block"), ("modules", "Per module type")):
        groups = result["rollup"].get(kind, {})
        out.append((title, [kind[:-1], "layers", "‖ΔW‖_F", "largest σ₁", "mean effective rank", "mean stable rank"],
                    [[g, _num(v["layers"]), _num(v["frobenius_norm"]), _num(v["spectral_norm"]),
                      _num(v["effective_rank"]), _num(v["stable_rank"])] for g, v in groups.items()]))
    if has_base:
        sweep = {}
        for r in result["layers"].values():
            for e, n in r["intruder_sweep"].items():
                sweep[float(e)] = sweep.get(float(e), 0) + n
        out.append(("Intruder dimensions over all layers, against ε",
                    ["ε"] + [f"{e:g}" for e in sorted(sweep)], [["count"] + [str(sweep[e]) for e in sorted(sweep)]]))
    for pair in result.get("interference", []):
        s = pair["summary"]
        out.append((f"Interference with {pair['other']}",
                    ["layers", "ΔW cosine", "output overlap", "input overlap", "sign conflict", "sign conflict (top)"],
                    [[_num(s["layers"]), _num(s["cosine"]), _num(s["out_overlap"]), _num(s["in_overlap"]),
                      _num(s["sign_conflict"]), _num(s["sign_conflict_top"])]]))
    out.append(("Layers", header, rows))
    return out


def markdown(result: dict, images: Sequence[str]) -> str:
    lines = [f"# Adapter report: {result['adapter']}", "", summary_line(result), ""]
    if result["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    for name in images:
        lines += [f"![{_caption(name, result)}]({name}.png)", ""]
    for title, header, rows in tables(result):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def page(result: dict, images: Sequence[str]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Adapter report: {esc(result['adapter'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;"
             "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>Adapter report: {esc(result['adapter'])}</h1>", f"<p>{esc(summary_line(result))}</p>"]
    if result["warnings"]:
        parts += ["<h2>Warnings</h2><ul>"] + [f"<li>{esc(w)}</li>" for w in result["warnings"]] + ["</ul>"]
    for name in images:
        caption = esc(_caption(name, result))
        parts.append(f'<figure><img src="{name}.png" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    for title, header, rows in tables(result):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    return "\n".join(parts + ["</body></html>", ""])


def _caption(name: str, result: dict) -> str:
    return PLOTS[name].format(k=result["k"], epsilon=result["epsilon"])


def summary_line(result: dict) -> str:
    c = result["config"]
    ranks = sorted({r["rank"] for r in result["layers"].values()})
    text = (f"{c['variant']} · r {c['r']} · alpha {c['lora_alpha']}{' · rsLoRA' if c['use_rslora'] else ''} · "
            f"{len(result['layers'])} adapted layers, ranks {ranks}")
    if "base" in result:
        total = sum(r["intruders"] for r in result["layers"].values())
        text += f" · base {result['base']}: {total} intruder dimensions (k {result['k']}, ε {result['epsilon']})"
    return text


# ---- plots --------------------------------------------------------------------------------------------------------
def plots(result: dict, out: Path) -> list[str]:
    """Write the PNGs this result has data for; returns their names (without .png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the report's plots need matplotlib: pip install 'lorakit[plot]'") from None
    layers = result["layers"]
    names = list(layers)
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, path in enumerate(names):
        s = [v for v in layers[path]["singular_values"] if v > 0]
        if s:
            ax.semilogy(range(1, len(s) + 1), s, color=plt.cm.viridis(i / max(len(names) - 1, 1)), lw=0.8)
    ax.set(xlabel="index", ylabel="singular value", title="ΔW spectra (colour: layer order)")
    save(fig, "spectra")

    blocks = result["rollup"].get("blocks", {})
    modules = result["rollup"].get("modules", {})
    grid = [[0.0] * len(modules) for _ in blocks]
    for path, r in layers.items():
        i, j = list(blocks).index(block_of(path)), list(modules).index(path.rsplit(".", 1)[-1])
        grid[i][j] = math.hypot(grid[i][j], r["frobenius_norm"])
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(modules) + 2), max(3, 0.25 * len(blocks) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(modules)), list(modules), rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), list(blocks), fontsize=6 if len(blocks) > 16 else 9)
    fig.colorbar(im, ax=ax, label="‖ΔW‖_F")
    save(fig, "norms")

    fig, ax = plt.subplots(figsize=(max(6, 0.08 * len(names) + 3), 3.5))
    ax.plot([layers[p]["effective_rank"] for p in names], ".", label="effective rank")
    ax.plot([layers[p]["stable_rank"] for p in names], ".", label="stable rank")
    ax.plot([layers[p]["rank"] for p in names], "-", color="grey", lw=0.8, label="rank r")
    ax.set(xlabel="layer (module order)", ylabel="rank")
    ax.legend()
    save(fig, "ranks")

    if "base" in result:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        left.bar(range(len(names)), [layers[p]["intruders"] for p in names], width=1.0)
        left.set(xlabel="layer (module order)", ylabel="intruders", title=f"ε = {result['epsilon']}")
        eps = sorted(next(iter(layers.values()))["intruder_sweep"])
        totals = [sum(r["intruder_sweep"][e] for r in layers.values()) for e in eps]
        right.plot(eps, totals, "o-")
        right.set(xlabel="ε", ylabel="intruders, all layers", title=f"top k = {result['k']}")
        save(fig, "intruders")

    if result.get("interference"):
        fig, ax = plt.subplots(figsize=(max(6, 0.08 * len(names) + 3), 3.5))
        for pair in result["interference"]:
            rows = pair["layers"]
            ax.plot([rows[p]["cosine"] if p in rows else math.nan for p in names], ".",
                    label=f"cosine with {Path(pair['other']).name}")
            ax.plot([rows[p]["sign_conflict"] if p in rows else math.nan for p in names], "x",
                    label=f"sign conflict with {Path(pair['other']).name}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="layer (module order)")
        ax.legend(fontsize=8)
        save(fig, "interference")
    return made


def _json_safe(value):
    """NaN and infinities as null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: dict, out: str | Path) -> Path:
    """OUT/report.json, report.md, report.html and the PNGs; returns OUT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = plots(result, out)
    (out / "report.json").write_text(json.dumps(_json_safe(result), indent=1))
    (out / "report.md").write_text(markdown(result, images))
    (out / "report.html").write_text(page(result, images))
    return out
