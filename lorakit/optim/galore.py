"""GaLore (Zhao et al., ICML 2024): full-parameter Adam with the gradients of 2-D weights projected to rank r.

For each projected weight W ∈ R^{m×n} with gradient G, at its step t (0-based, counted per weight):
1) if t mod T = 0 (T = `update_proj_gap`): SVD of the current G. m ≥ n: P = V[:, :r] (n×r) and R = G P (m×r);
   m < n: P = U[:, :r] (m×r) and R = Pᵀ G (r×n).
2) Adam moments on R (state `exp_avg`/`exp_avg_sq` of R's shape: m×r or r×n, never m×n), bias-corrected.
3) N = m̂ / (√v̂ + ε), back-projected and scaled: G̃ = scale·N Pᵀ (or scale·P N).
4) W ← W − lr·G̃, then decoupled weight decay W ← W − lr·wd·W (the reference's order).
The moments are neither rotated nor reset when P changes (as the reference, galore_torch @2cc66f8).
Every other trainable parameter (embeddings, biases, norms, the output head, small matrices) gets plain AdamW.

Full-parameter training: the factory makes every floating-point parameter of the model trainable
(`requires_grad = True`) and gives all of them to the optimizer, so the trainer's checkpoint saves the whole model.
It refuses a model with lorakit adapters injected (GaLore trains the base weights; no adapter).

Which weights are projected: by default every 2-D weight of an `nn.Linear` (or transformers `Conv1D`) whose
min(m, n) > rank, except the model's output embeddings (the LM head); `target_modules` (a list of module-name
substrings, like the reference's ["attn", "mlp"]) restricts them.

Options (`optim_args`): `rank` (128), `update_proj_gap` T (200), `scale` (0.25), `target_modules` (None: all),
`per_layer` (False), `lr`, `betas`, `eps`, `weight_decay`.
`per_layer=True`: each weight is updated in its post-accumulate-grad hook during backward and its gradient freed
at once, so full gradients never coexist. Then `step()` only updates parameters that still hold a gradient (none),
gradient clipping has nothing to clip (the trainer logs grad_norm 0), gradient accumulation must be 1, and the
learning rate used is the one set before the previous step (the schedule lags by one step). Call `remove_hooks()`
to detach the hooks.

The state is plain tensors and ints (`step`, `exp_avg`, `exp_avg_sq`, `projector`), so checkpoints reload with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import AdaptedLayer
from . import register_optimizer

_OPTIONS = {"rank", "update_proj_gap", "scale", "target_modules", "per_layer", "lr", "betas", "eps", "weight_decay"}


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; groups carrying `rank` project their (2-D) gradients as above."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, per_layer=False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._hooks = []
        if per_layer:
            for group in self.param_groups:
                for p in group["params"]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._per_layer_hook(group)))

    def _per_layer_hook(self, group):
        def hook(p):
            with torch.no_grad():
                self._update(p, group)
            p.grad = None
        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    @staticmethod
    def projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """P for gradient `grad` (m×n): V[:, :r] (n×r) when m ≥ n, else U[:, :r] (m×r)."""
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        m, n = grad.shape
        return vh[:rank].T.contiguous() if m >= n else u[:, :rank].contiguous()

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        state = self.state[p]
        projected = "rank" in group
        if not state:
            state["step"] = 0
        t = state["step"]
        if projected:
            if t % group["update_proj_gap"] == 0:
                state["projector"] = self.projector(grad, group["rank"])
            proj = state["projector"]
            tall = p.shape[0] >= p.shape[1]
            grad = grad @ proj if tall else proj.T @ grad
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["step"] = t = t + 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        update = m / (v.sqrt() + group["eps"])
        if projected:
            update = group["scale"] * (update @ proj.T if tall else proj @ update)
        p.add_(update.to(p.dtype), alpha=-step_size)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _check(name, value, ok, expect):
    if not ok(value):
        raise ConfigError(f"galore option {name} must be {expect}, got {value!r}")
    return value


@register_optimizer("galore")
def galore(model, args, **options):
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"unknown galore option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    is_int = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    rank = _check("rank", options.get("rank", 128), is_int, "an integer ≥ 1")
    gap = _check("update_proj_gap", options.get("update_proj_gap", 200), is_int, "an integer ≥ 1")
    scale = _check("scale", options.get("scale", 0.25),
                   lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")
    per_layer = _check("per_layer", options.get("per_layer", False), lambda v: isinstance(v, bool), "true or false")
    targets = options.get("target_modules")
    _check("target_modules", targets, lambda v: v is None or (isinstance(v, (list, tuple)) and v
                                                               and all(isinstance(s, str) for s in v)),
           "a non-empty list of module-name substrings")
    if per_layer and args.gradient_accumulation_steps != 1:
        raise ConfigError("galore option per_layer needs gradient_accumulation_steps = 1 (each backward updates)")
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ConfigError("galore trains the base model's weights (full-parameter); this model has lorakit adapters")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    projected = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not _is_linear(module) or module is head or not isinstance(w, nn.Parameter) or w.dim() != 2:
            continue
        if targets is not None and not any(s in name for s in targets):
            continue
        if min(w.shape) > rank:
            projected[id(w)] = w
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    plain = [p for p in params if id(p) not in projected]
    groups = []
    if projected:
        groups.append({"params": list(projected.values()), "rank": rank, "update_proj_gap": gap, "scale": float(scale)})
    if plain:
        groups.append({"params": plain})
    return GaLoreAdamW(groups, lr=options.get("lr", args.learning_rate),
                       betas=tuple(options.get("betas", (args.adam_beta1, args.adam_beta2))),
                       eps=options.get("eps", args.adam_epsilon),
                       weight_decay=options.get("weight_decay", args.weight_decay), per_layer=per_layer)
