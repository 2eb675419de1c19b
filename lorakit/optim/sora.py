"""SoRA's optimizer and sparsifying scheduler (Ding et al., EMNLP 2023; card structures.md §22).

`sora` optimizer: AdamW for every trainable parameter, and for the gates of SoRA adapters (`lora_gate`, their own
param group "gate": weight decay 0, lr `gate_lr` or the main lr) an AdamW step followed by a threshold step with
- `threshold="constant"` (default, the released `SparseAdamW`): τ = λ₂ (`sparse_lambda_2`);
- `threshold="lr"` (the reference's `_multiply_lr` variant, the paper's η_t·λ form): τ = λ₂·lr_t, lr_t the gate
  group's current (scheduled) lr.
The step (`proximal`):
- "reference" (default): the released optimizer's three in-place lines, in order (TsinghuaC3I/SoRA
  `src/sparse_optimizer.py` L116-119): g[g > τ] −= τ; g[g < −τ] += τ; g[|g| < τ] = 0. The third line sees the
  already shrunk values, so every |g| < 2τ ends at 0 except |g| = τ exactly (kept) and |g| = 2τ (→ τ):
  λ = 0.1 on [.5, .15, .05, −.15, −.25] gives [.4, 0, 0, 0, −.15]. It shuts gates faster than the paper's prox.
- "soft": the paper's proximal operator of τ·‖g‖₁, g ← sign(g)·max(|g| − τ, 0) ([.4, .05, 0, −.05, −.15]).

L1 term (card: loss += λ·mean|g|, `sparse_lambda`, on top of the proximal step — both, as the reference does): with
`l1="grad"` (default) the optimizer adds that term's gradient λ·sign(g)/N (N = gate entries it holds) to the gate
gradients before the Adam update, so the Trainer (whose loss is the task's) needs no change. One difference from the
reference: the term's gradient is added after the trainer's gradient clipping (the reference clips the sum). With
`l1="loss"` the optimizer leaves the gradients alone and you add `sparse_lambda · lorakit.variants.sora.l1_penalty`
to your loss yourself (exactly the reference; a plain loop). `sparse_lambda=0` turns the term off.

Sparsifying scheduler (`lambda_schedule` "linear" | "log_linear" | "exp_linear" from `sparse_lambda_2` to
`max_lambda` in `lambda_num` values, as the reference): `optimizer.step_lambda()` moves λ₂ to the next value;
`sparsify_stages` runs the stages after the main training and records (stage, λ₂, sparsity, metric) rows. λ₂ and the
stage index live in the gate param group, so they are saved and restored with `optimizer.state_dict()`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import ConfigError
from . import register_optimizer
from .standard import trainable

_OPTIONS = ("sparse_lambda", "sparse_lambda_2", "threshold", "proximal", "gate_lr", "l1", "lambda_schedule", "max_lambda",
            "lambda_num", "adapter")
SCHEDULES = ("linear", "log_linear", "exp_linear")


def soft_threshold_(g: torch.Tensor, tau: float) -> torch.Tensor:
    """In place: g ← sign(g)·max(|g| − τ, 0), the proximal operator of τ·‖g‖₁."""
    if tau > 0:
        g.copy_(torch.sign(g) * (g.abs() - tau).clamp_(min=0))
    return g


def reference_threshold_(g: torch.Tensor, tau: float) -> torch.Tensor:
    """In place, the released SparseAdamW's step: shrink entries beyond ±τ by τ, then zero what is now inside
    (−τ, τ) (see the module doc for the resulting map)."""
    if tau > 0:
        g[g > tau] -= tau
        g[g < -tau] += tau
        g[g.abs() < tau] = 0.0
    return g


PROXIMAL = {"reference": reference_threshold_, "soft": soft_threshold_}


def lambda_values(start: float, schedule: Optional[str], max_lambda: Optional[float] = None,
                  lambda_num: Optional[int] = None) -> list[float]:
    """λ₂ per stage: [start] without a schedule; else `lambda_num` values from `start` to `max_lambda`, linear,
    log-linear (log of a linear ramp of exp λ, the reference's "log_linear") or exp-linear (geometric)."""
    if schedule is None:
        return [float(start)]
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim option lambda_schedule must be one of {SCHEDULES} or None, got {schedule!r}")
    if max_lambda is None or lambda_num is None:
        raise ConfigError(f"optim option lambda_schedule={schedule!r} needs max_lambda and lambda_num")
    if schedule == "linear":
        values = np.linspace(start, max_lambda, lambda_num)
    elif schedule == "log_linear":
        values = np.log(np.linspace(np.exp(start), np.exp(max_lambda), lambda_num))
    else:
        if start <= 0:
            raise ConfigError(f"optim option lambda_schedule='exp_linear' needs sparse_lambda_2 > 0, got {start!r}")
        values = np.exp(np.linspace(np.log(start), np.log(max_lambda), lambda_num))
    return [float(v) for v in values]


class SoRAOptimizer(torch.optim.AdamW):
    """AdamW whose param groups flagged `proximal` (the gates) get the L1 gradient and the soft threshold."""

    def __init__(self, params, *, sparse_lambda: float = 10.0, l1: str = "grad", **kw):
        super().__init__(params, **kw)
        self.sparse_lambda, self.l1 = sparse_lambda, l1

    def gate_groups(self) -> list[dict]:
        return [g for g in self.param_groups if g.get("proximal")]

    def threshold(self, group: dict) -> float:
        """τ of this step for a gate group: λ₂, or λ₂·lr with `threshold="lr"`."""
        lam = group["sparse_lambda_2"]
        return lam * group["lr"] if group["threshold"] == "lr" else lam

    @torch.no_grad()
    def add_l1_grad(self) -> None:
        """Add ∂(λ·mean|g|)/∂g = λ·sign(g)/N to every gate gradient (N = the gate entries held here)."""
        gates = [p for g in self.gate_groups() for p in g["params"]]
        n = sum(p.numel() for p in gates)
        if self.sparse_lambda == 0 or n == 0:
            return
        for p in gates:
            if p.grad is not None:
                p.grad.add_(torch.sign(p), alpha=self.sparse_lambda / n)

    @torch.no_grad()
    def proximal_step(self) -> None:
        for group in self.gate_groups():
            tau, shrink = self.threshold(group), PROXIMAL[group["proximal_step"]]
            for p in group["params"]:
                if p.grad is not None:
                    shrink(p, tau)

    def step(self, closure=None):
        loss = None
        if closure is not None:  # gradients first, then the L1 term's gradient on top
            with torch.enable_grad():
                loss = closure()
        if self.l1 == "grad":
            self.add_l1_grad()
        super().step()
        self.proximal_step()
        return loss

    # ---- the sparsifying schedule -----------------------------------------------------------------
    @property
    def lambda_2(self) -> float:
        return self.gate_groups()[0]["sparse_lambda_2"]

    @property
    def stages(self) -> int:
        return len(self.gate_groups()[0]["lambdas"])

    def step_lambda(self) -> bool:
        """Move λ₂ to the schedule's next value; False (λ₂ unchanged) at the end of the schedule."""
        moved = False
        for group in self.gate_groups():
            if group["lambda_idx"] + 1 < len(group["lambdas"]):
                group["lambda_idx"] += 1
                group["sparse_lambda_2"] = group["lambdas"][group["lambda_idx"]]
                moved = True
        return moved


def _number(name, value, minimum=0.0, strict=False, allow_none=False):
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        raise ConfigError(f"optim option {name} must be a finite number {'>' if strict else '≥'} {minimum:g}, "
                          f"got {value!r}")
    return float(value)


def sora_groups(model, adapter: Optional[str] = None) -> tuple[list, list]:
    """(gate parameters of SoRA adapters (of `adapter` only when given), every other trainable parameter)."""
    from ..variants.sora import sora_layers

    params = trainable(model)
    gates = [v.lora_gate for v in sora_layers(model, adapter).values() if v.lora_gate.requires_grad]
    if not gates:
        raise ConfigError("optimizer 'sora' found no trainable SoRA gate (inject an AdapterConfig with "
                          f"variant='sora'{'' if adapter is None else f' named {adapter!r}'})")
    ids = {id(g) for g in gates}
    return gates, [p for p in params if id(p) not in ids]


@register_optimizer("sora")
def sora(model, args, **options) -> SoRAOptimizer:
    """AdamW + proximal gates. Options (reference names): sparse_lambda (λ of the L1 term, default 10 as the GLUE
    scripts), sparse_lambda_2 (λ₂ threshold, 3e-4), threshold ("constant" | "lr"), proximal ("reference" |
    "soft"), gate_lr (default the main lr),
    l1 ("grad" | "loss"), lambda_schedule (None | "linear" | "log_linear" | "exp_linear"), max_lambda, lambda_num
    (≥ 1), adapter (only this adapter's gates; default every SoRA adapter's)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown sora option(s) {unknown}; known: {list(_OPTIONS)}")
    lam = _number("sparse_lambda", options.get("sparse_lambda", 10.0))
    lam2 = _number("sparse_lambda_2", options.get("sparse_lambda_2", 3e-4))
    threshold = options.get("threshold", "constant")
    if threshold not in ("constant", "lr"):
        raise ConfigError(f"optim option threshold must be 'constant' or 'lr', got {threshold!r}")
    proximal = options.get("proximal", "reference")
    if proximal not in PROXIMAL:
        raise ConfigError(f"optim option proximal must be one of {list(PROXIMAL)}, got {proximal!r}")
    l1 = options.get("l1", "grad")
    if l1 not in ("grad", "loss"):
        raise ConfigError(f"optim option l1 must be 'grad' or 'loss', got {l1!r}")
    gate_lr = _number("gate_lr", options.get("gate_lr"), strict=True, allow_none=True)
    max_lambda = _number("max_lambda", options.get("max_lambda"), allow_none=True)
    num = options.get("lambda_num")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ConfigError(f"optim option lambda_num must be an integer ≥ 1, got {num!r}")
    lambdas = lambda_values(lam2, options.get("lambda_schedule"), max_lambda, num)
    gates, rest = sora_groups(model, options.get("adapter"))
    groups = [{"params": rest, "lr": args.learning_rate, "weight_decay": args.weight_decay, "name": "main"}] \
        if rest else []
    groups.append({"params": gates, "lr": args.learning_rate if gate_lr is None else gate_lr, "weight_decay": 0.0,
                   "name": "gate", "proximal": True, "threshold": threshold,
                   "proximal_step": proximal, "sparse_lambda_2": lambdas[0],
                   "lambdas": lambdas, "lambda_idx": 0})
    return SoRAOptimizer(groups, sparse_lambda=lam, l1=l1, lr=args.learning_rate,
                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def sparsify_stages(model, optimizer: SoRAOptimizer, train_stage: Callable[[int], None],
                    evaluate: Callable[[], object], name: Optional[str] = None,
                    on_stage: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """The sparsifying scheduler: after the main training, for each further λ₂ of the optimizer's schedule
    (`lambda_num − 1` stages; the reference trains 15 epochs per stage), raise λ₂ (`step_lambda`), run
    `train_stage(stage)`, evaluate. Returns one row per stage, stage 0 = the model as it is on entry:
    {"stage", "lambda_2", "sparsity" (fraction of shut gates of adapter `name`, all SoRA adapters if None),
    "open_ranks", "metric"} plus every key of `evaluate()` when it returns a dict ("metric" is then its first value).
    `on_stage(row)` is called after each row (e.g. to save the adapter or prune it).

    `train_stage` works with any loop: see `trainer_stages` for lorakit's Trainer; a plain loop just runs its steps
    with `optimizer`."""
    from ..variants.sora import gate_sparsity, sora_layers

    def row(stage):
        result = evaluate()
        r = {"stage": stage, "lambda_2": optimizer.lambda_2, "sparsity": gate_sparsity(model, name),
             "open_ranks": sum(int(v.kept().sum()) for v in sora_layers(model, name).values())}
        if isinstance(result, dict):
            r["metric"] = next(iter(result.values())) if result else None
            r.update(result)
        else:
            r["metric"] = float(result)
        if on_stage is not None:
            on_stage(r)
        return r

    rows = [row(0)]
    for stage in range(1, optimizer.stages):
        optimizer.step_lambda()
        train_stage(stage)
        rows.append(row(stage))
    return rows


def trainer_stages(model, task, args, train_data, eval_data, optimizer: SoRAOptimizer,
                   stage_epochs: float = 15.0, metric: Optional[str] = None):
    """(train_stage, evaluate) for `sparsify_stages` with lorakit's Trainer: each stage is a new Trainer over the
    same model and optimizer (Adam moments and λ₂ carry on; the lr schedule restarts), `stage_epochs` epochs (the
    reference's 15; `args.max_steps` > 0 overrides), writing under `args.output_dir/stage_<k>`; evaluate returns
    {"eval_<metric>": value, ...} on `eval_data` with the task's main metric first."""
    import dataclasses

    from ..train.trainer import Trainer, evaluate as run_eval

    def train_stage(stage):
        stage_args = dataclasses.replace(args, output_dir=f"{args.output_dir}/stage_{stage}",
                                         num_train_epochs=stage_epochs, load_best_model_at_end=False)
        Trainer(model, task, stage_args, train_data, optimizer=optimizer).train()

    def evaluate():
        out = run_eval(model, task, eval_data, args.per_device_eval_batch_size)
        key = "eval_" + (metric or task.main_metric)
        return {key: out[key], **{k: v for k, v in out.items() if k != key}}

    return train_stage, evaluate


__all__ = ["SoRAOptimizer", "lambda_values", "reference_threshold_", "soft_threshold_", "sparsify_stages", "trainer_stages"]
