"""Combining adapters (the folder DESIGN.md reserves for merge, compose, unlearn, transfer).

- merging (`merge`): exact delta-space `cat` / `linear`, element-wise TIES / DARE / DELLA / magnitude pruning /
  Breadcrumbs on ΔW (`sparsify`), aligned LoRA-LEGO / KnOTS (`aligned`), PEFT's own semantics (`peft_compat`); on a
  model (`merge_adapters`) or on PEFT LoRA folders (`merge_folders`);
- learned combination weights (`learn`): LoraHub-style search, per-layer gradient scalars, and the controls;
- unlearning (`unlearn`): MAAT's projected ascent, SVD direction pruning, negation and repair, with baselines;
- run-time composition (`gates`, with `lorakit.route(model, weights=...)`): Arrow, LoRA-Flow, AutoLoRA and MoLE gates;
  step schedules for diffusion sampling (`diffusion`: switch, composite, CMLoRA, per-step weights) and regional
  composition (`regional`: RegionGate, LoRA-Composer, CLoRA);
- retrieval (`retrieve`): adapters picked by their description (MiniLM) or by their weights (AutoLoRA's encoder).
"""
from .aligned import knots, lego
from .fit import lm_loss, mean_loss
from .gates import ArrowGate, FusionGate, LayerGate, MoleGate, gated
from .learn import best_single, learn_scalars, learn_weights, random_pool, uniform_average
from .merge import METHODS, MergeOptions, merge_adapters, merge_folders, merge_on_model
from .retrieve import DescriptionIndex, WeightEncoder, WeightIndex, mixture_weights, train_encoder
from .unlearn import (fit_adapter, gradient_ascent, maat, negate, project_out, projected_ascent, repair,
                      svd_prune)

__all__ = [
    "ArrowGate", "DescriptionIndex", "FusionGate", "LayerGate", "MoleGate", "MergeOptions", "METHODS", "WeightEncoder",
    "WeightIndex", "best_single", "fit_adapter", "gated", "gradient_ascent", "knots", "learn_scalars",
    "learn_weights", "lego", "lm_loss", "maat", "mean_loss", "merge_adapters", "merge_folders", "merge_on_model",
    "mixture_weights", "negate", "project_out", "projected_ascent", "random_pool", "repair", "svd_prune",
    "train_encoder", "uniform_average",
]
