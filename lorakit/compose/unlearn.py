"""MAAT-style unlearning on adapter weights only (training.md §10; the combining issue's item 5).

The model carries an adapter `name` fine-tuned on data that includes a forget set D_f; D_r is the retain set. Each
phase is a function on adapters of the model; the base model is never modified and only adapter tensors ever get
gradients (computed with `torch.autograd.grad` on the working adapter's trainable tensors, nothing else requires
grad while a phase runs). Every function writes its result as the adapter `new_name` (made active) and leaves `name`
untouched; `new_name == name` is the explicit way to edit `name` in place (what `maat` does on its working copy).

- Phase 1, `projected_ascent`: N steps of gradient *ascent* on the forget loss, each forget gradient projected off
  the retain gradient per tensor (`project_out`; two backward passes a step); plain SGD steps θ ← θ + η·g̃_f, with
  an optional cap on the step's global norm (a scalar, so it keeps the projection). Baseline: `gradient_ascent`
  (no retain gradient, no projection).
- Phase 2, `svd_prune`: per adapted layer the SVD of ΔW = s·B·A from the factors (QR of the factors + SVD of the
  r×r core, `lorakit.rank.squeeze.factor_svd`; ΔW is never formed), each right singular direction v_j scored by the
  share of the layer's input energy it captures on D_f against D_r (inputs captured with forward hooks), the
  forget-dominant directions masked, the rest written back as a plain LoRA at the kept rank.
  `negate`: ΔW ← ΔW − λ·ΔW_forget exactly in delta space (`merge_adapters` with weights [1, −λ]); `fit_adapter`
  trains the ΔW_forget adapter on D_f.
- Phase 3, `repair`: AdamW on the retain set minimising KL(p_ref ‖ p_θ) + β·(relative hidden-state error against
  the reference), the reference being the model with the original adapter (switched to with `set_active` for a
  no-grad forward each step).
- `maat`: the pipeline (1 → 2 → 3, each optional) on a copy of the adapter, with a report.

Choices the card leaves open ([U]), and why:
- Projection per tensor, always (not only when ⟨g_f, g_r⟩ > 0; `only_conflicts=True` gives the PCGrad variant):
  the card's formula. Per tensor implies the global ⟨step, g_r⟩ = 0, so a step leaves the retain loss unchanged to
  first order. A zero retain gradient leaves g_f unchanged.
- Optimizer of phase 1: plain SGD, so the first-order guarantee holds for the step actually taken (Adam's
  per-coordinate scaling would break the orthogonality); `max_norm` caps the step, `stop_at` stops the ascent once
  the forget loss reaches a value (ascent is unbounded: without it the model degrades without limit).
- Direction score: e_j(D) = E_x[(v_jᵀx)²] / E_x[‖x‖²] over the real tokens of D (the share of input energy along
  v_j, so forget and retain inputs of different norms compare fairly); ratio_j = e_j(D_f) / (e_j(D_f) + e_j(D_r)),
  0.5 when the direction serves both alike. σ_j cancels in the ratio. Masked: ratio_j > `threshold` (default 0.8,
  i.e. at least 4× more forget than retain energy), or the top `fraction` of each layer's directions by ratio among
  those above 0.5, or any `mask_fn(path, scores) -> bool tensor`. A layer whose every direction is masked keeps a
  rank-1 pair with B = 0 (ΔW = 0 exactly; PEFT has no rank 0).
- ΔW_forget (`fit_adapter`): a fresh LoRA trained on D_f on top of the base model alone (task arithmetic's task
  vector τ_f = θ_f − θ_0), AdamW; λ is the caller's (default 1).
- Repair reference: the original adapter stays on the model and is switched to for one no-grad forward per step,
  rather than precomputing targets: full-vocabulary logits of every retain token (49k floats a token for SmolLM2)
  and hidden states of every layer would not fit in memory for a useful retain set; the extra forward costs about a
  third of a training step. KL is taken at every real (attention-mask) position, over the full vocabulary. The
  hidden term is Σ‖h − h_ref‖² / Σ‖h_ref‖² per chosen layer (default: every decoder layer's output,
  `hidden_states[1:]`), averaged over layers: relative, so β does not depend on the model's hidden scale.
- Phases run with the model in eval mode (no dropout: the projection needs both gradients at one deterministic
  point); the mode is restored after.
- Results are plain LoRAs (scale 1) once a phase re-factors them (prune, negate); phase 1 and 3 keep the
  adapter's own variant and parametrisation (`clone_adapter`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..model import (active_adapters, adapter_names, adapter_parameters, attach, check_free_name, check_name,
                    clone_adapter, delete_adapter, disabled, get_config, _known, prepare, set_active)
from .fit import Batches, LossFn, descend, lm_loss, mean_loss, model_inputs, only_trainable


def project_out(g: torch.Tensor, g_ref: torch.Tensor, only_conflicts: bool = False) -> torch.Tensor:
    """g − (⟨g, g_ref⟩ / ‖g_ref‖²)·g_ref (a new tensor; g itself when g_ref is zero). `only_conflicts`: project only
    when ⟨g, g_ref⟩ < 0 (PCGrad); the ascent passes −g_f there, so "conflict" means the step would raise the retain
    loss."""
    if g.shape != g_ref.shape:
        raise ConfigError(f"project_out needs tensors of one shape, got {tuple(g.shape)} and {tuple(g_ref.shape)}")
    norm_sq = g_ref.double().pow(2).sum()
    if norm_sq == 0:
        return g.clone()
    inner = (g.double() * g_ref.double()).sum()
    if only_conflicts and inner >= 0:
        return g.clone()
    return (g.double() - (inner / norm_sq) * g_ref.double()).to(g.dtype)


def _batches(batches, what: str) -> list[dict]:
    if isinstance(batches, dict):
        batches = [batches]
    batches = list(batches) if batches is not None else []
    if not batches or not all(isinstance(b, dict) for b in batches):
        raise ConfigError(f"{what} must be a batch (dict of tensors) or a non-empty list of them")
    return batches


def _positive_int(value, what: str, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ConfigError(f"{what} must be a {'non-negative' if zero else 'positive'} int, got {value!r}")
    return value


def _finite(value, what: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ConfigError(f"{what} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return float(value)


def _check_new(model: nn.Module, name: str, new_name: str) -> None:
    """`name` exists; `new_name` is valid and free, or equals `name` (in place)."""
    _known(model, name)
    if new_name != name:
        check_free_name(model, new_name)


def trainable_tensors(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s floating-point parameters (its factors, shared state, trained module copies), once each."""
    seen, out = set(), []
    for t in adapter_parameters(model, name).values():
        if isinstance(t, nn.Parameter) and t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    if not out:
        raise ConfigError(f"adapter {name!r} has no floating-point parameters to train")
    return out


@contextlib.contextmanager
def _active(model: nn.Module, names):
    before = active_adapters(model)
    set_active(model, names)
    try:
        yield
    finally:
        set_active(model, [n for n in before if n in adapter_names(model)])


def _rename(model: nn.Module, old: str, new: str) -> None:
    """Adapter `old` becomes `new` (which must be free), keeping its place in the active set."""
    active = active_adapters(model)
    clone_adapter(model, old, new)
    delete_adapter(model, old)
    set_active(model, [new if n == old else n for n in active])


def _start(model: nn.Module, name: str, new_name: str) -> str:
    """The adapter a phase edits: `name` itself (in place) or a fresh copy `new_name`."""
    if new_name != name:
        clone_adapter(model, name, new_name)
    return new_name


def _loss_value(loss: torch.Tensor, what: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ConfigError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                          f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''} on the {what} batch")


# ---- phase 1: gradient-projected ascent ---------------------------------------------------------------------------
def projected_ascent(model: nn.Module, name: str, new_name: str, forget: Batches, retain: Optional[Batches],
                     steps: int = 10, lr: float = 1e-3, loss_fn: LossFn = lm_loss, project: bool = True,
                     only_conflicts: bool = False, max_norm: Optional[float] = None,
                     stop_at: Optional[float] = None) -> dict:
    """MAAT phase 1: `steps` SGD steps of ascent on the forget loss over the adapter's trainable tensors, each step
    θ ← θ + lr·g̃_f with g̃_f = `project_out`(g_f, g_r) per tensor (g_r: the retain loss gradient at the same θ; two
    backward passes a step). Batches cycle. `max_norm` caps the step's global norm; `stop_at` stops once the forget
    loss reaches it. The result is adapter `new_name` (a copy of `name`; `new_name == name` edits it in place), made
    active. Returns {"forget_loss": [per step, before the step], "retain_loss": [...], "cosine": [cos(g_f, g_r)],
    "steps": steps taken}."""
    forget = _batches(forget, "forget")
    retain = _batches(retain, "retain") if (project or retain is not None) else None
    _positive_int(steps, "steps", zero=True)
    _finite(lr, "lr", positive=True)
    if max_norm is not None:
        _finite(max_norm, "max_norm", positive=True)
    if stop_at is not None:
        _finite(stop_at, "stop_at")
    _check_new(model, name, new_name)
    trainable_tensors(model, name)
    work = _start(model, name, new_name)
    set_active(model, [work])
    params = trainable_tensors(model, work)
    report = {"forget_loss": [], "retain_loss": [], "cosine": [], "steps": 0}
    with only_trainable(model, params):
        for step in range(steps):
            loss_f = loss_fn(model, forget[step % len(forget)])
            _loss_value(loss_f, "forget")
            if stop_at is not None and float(loss_f.detach()) >= stop_at:
                report["forget_loss"].append(float(loss_f.detach()))
                break
            g_f = torch.autograd.grad(loss_f, params, allow_unused=True)
            g_f = [torch.zeros_like(p) if g is None else g for g, p in zip(g_f, params)]
            direction = g_f
            if retain is not None:
                loss_r = loss_fn(model, retain[step % len(retain)])
                _loss_value(loss_r, "retain")
                g_r = torch.autograd.grad(loss_r, params, allow_unused=True)
                g_r = [torch.zeros_like(p) if g is None else g for g, p in zip(g_r, params)]
                report["retain_loss"].append(float(loss_r.detach()))
                report["cosine"].append(_cosine(g_f, g_r))
                if project:  # ascent moves along +g_f: it conflicts with retention when ⟨g_f, g_r⟩ > 0
                    direction = [-project_out(-a, b, only_conflicts) for a, b in zip(g_f, g_r)] if only_conflicts \
                        else [project_out(a, b) for a, b in zip(g_f, g_r)]
            report["forget_loss"].append(float(loss_f.detach()))
            scale = lr
            if max_norm is not None:
                norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction)) * lr
                scale = lr * min(1.0, max_norm / norm) if norm > 0 else lr
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(d.to(p.dtype), alpha=scale)
            report["steps"] += 1
    return report


def gradient_ascent(model: nn.Module, name: str, new_name: str, forget: Batches, steps: int = 10,
                    lr: float = 1e-3, loss_fn: LossFn = lm_loss, max_norm: Optional[float] = None,
                    stop_at: Optional[float] = None) -> dict:
    """Baseline: plain gradient ascent on the forget loss (no retain gradient, no projection), SGD steps; same
    result and report conventions as `projected_ascent`."""
    return projected_ascent(model, name, new_name, forget, None, steps, lr, loss_fn, project=False,
                            max_norm=max_norm, stop_at=stop_at)


def _cosine(a: list, b: list) -> float:
    inner = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x.double().pow(2).sum()) for x in a))
    nb = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
    return inner / (na * nb) if na > 0 and nb > 0 else 0.0


# ---- phase 2: SVD rank-dimension pruning ------------------------------------------------------------------------
class DirectionScores(NamedTuple):
    """One layer's singular directions: σ (k,), and the share of input energy along each v_j on the forget and
    retain inputs; `ratio` = forget / (forget + retain) (0.5 where both are 0)."""

    sigma: torch.Tensor
    forget: torch.Tensor
    retain: torch.Tensor

    @property
    def ratio(self) -> torch.Tensor:
        total = self.forget + self.retain
        return torch.where(total > 0, self.forget / total.clamp(min=1e-300), torch.full_like(total, 0.5))


def threshold_mask(threshold: float) -> Callable[[str, DirectionScores], torch.Tensor]:
    """Mask the directions whose forget ratio exceeds `threshold`."""
    return lambda path, scores: scores.ratio > threshold


def fraction_mask(fraction: float) -> Callable[[str, DirectionScores], torch.Tensor]:
    """Mask the top ⌈fraction·k⌉ directions of each layer by forget ratio, among those with ratio > 0.5."""
    def mask(path, scores):
        ratio = scores.ratio
        n = math.ceil(fraction * len(ratio))
        out = torch.zeros(len(ratio), dtype=torch.bool)
        if n:
            top = torch.argsort(ratio, descending=True)[:n]
            out[top] = ratio[top] > 0.5
        return out
    return mask


def direction_energy(model: nn.Module, layers: dict, batches: list[dict]) -> dict[str, torch.Tensor]:
    """{path: E[(v_jᵀx)²]/E[‖x‖²] per column of `layers[path]` (v, (in, k))} over the real tokens of `batches`, x
    the input of the adapted layer at `path` (forward hooks; one no-grad pass per batch with the current active set).
    """
    from ..kinds import EmbeddingKind

    modules = dict(model.named_modules())
    sums = {p: [torch.zeros(v.shape[1], dtype=torch.float64, device=v.device), 0.0] for p, v in layers.items()}
    mask_now: list = [None]

    def hook_for(path, v):
        embedding = isinstance(modules[path].kind, EmbeddingKind)

        def hook(module, args, output):
            x = args[0]
            mask = mask_now[0]
            if embedding:  # the input is one-hot: v_jᵀx = v[id, j], ‖x‖ = 1
                ids = x if mask is None or mask.shape != x.shape else x[mask.bool()]
                proj, norms = v[ids.reshape(-1)], torch.ones(ids.numel(), dtype=torch.float64, device=v.device)
            else:
                if x.shape[-1] != v.shape[0]:
                    raise ConfigError(f"svd_prune scores inputs of linear-like layers; {path} takes inputs of shape "
                                      f"{tuple(x.shape)} against a ΔW with {v.shape[0]} input features (conv)")
                rows = x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
                rows = rows.detach().to(torch.float64)
                proj, norms = rows @ v, rows.pow(2).sum(-1)
            sums[path][0] += proj.pow(2).sum(0)
            sums[path][1] += float(norms.sum())
        return hook

    handles = [modules[p].register_forward_hook(hook_for(p, v)) for p, v in layers.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask_now[0] = b.get("attention_mask")
                model(**model_inputs(b))
    finally:
        for h in handles:
            h.remove()
    return {p: s / t if t > 0 else torch.zeros_like(s) for p, (s, t) in sums.items()}


def svd_prune(model: nn.Module, name: str, new_name: str, forget: Batches, retain: Batches,
              threshold: Optional[float] = 0.8, fraction: Optional[float] = None,
              mask_fn: Optional[Callable[[str, DirectionScores], torch.Tensor]] = None,
              split: str = "balanced") -> dict:
    """MAAT phase 2 (rank-dimension pruning): per adapted layer of `name`, the SVD U Σ Vᵀ of ΔW from its factors,
    each direction scored (`DirectionScores`: input-energy share along v_j on `forget` vs `retain`, run with `name`
    active), the masked ones dropped, and Σ_{kept} σ_j u_j v_jᵀ written as a plain LoRA (scale 1) at the kept rank.
    The mask: `mask_fn(path, scores) -> bool (k,)` when given, else `fraction_mask(fraction)` when `fraction` is
    given, else `threshold_mask(threshold)`. The result is adapter `new_name` (`new_name == name` replaces `name`),
    made active. Adapters with trained module copies (modules_to_save) and DoRA are refused (MergeError).
    Returns {path: {"rank": k, "kept": kept rank, "masked": [direction indices], "ratio": [per direction]}}."""
    from ..rank.squeeze import SVD, factor_svd, split_factors
    from .layers import attach_result, model_layers

    forget, retain = _batches(forget, "forget"), _batches(retain, "retain")
    if mask_fn is None:
        if fraction is not None:
            if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
                raise ConfigError(f"fraction must be in [0, 1], got {fraction!r}")
            mask_fn = fraction_mask(float(fraction))
        elif threshold is not None:
            if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
                raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
            mask_fn = threshold_mask(float(threshold))
        else:
            raise ConfigError("give a threshold, a fraction or a mask_fn")
    elif not callable(mask_fn):
        raise ConfigError(f"mask_fn must be callable, got {mask_fn!r}")
    _check_new(model, name, new_name)
    like = get_config(model, name)
    layers = model_layers(model, [name], [1.0])  # refuses DoRA, token-routed variants, module copies
    svds = {p: factor_svd(layer.parts[0].a, layer.parts[0].b, layer.parts[0].scale) for p, layer in layers.items()}
    with _active(model, [name]):
        e_f = direction_energy(model, {p: s.v for p, s in svds.items()}, forget)
        e_r = direction_energy(model, {p: s.v for p, s in svds.items()}, retain)
    factors, report = {}, {}
    for path, svd in svds.items():
        scores = DirectionScores(svd.s, e_f[path].to(svd.s), e_r[path].to(svd.s))
        masked = torch.as_tensor(mask_fn(path, scores), dtype=torch.bool).reshape(-1).cpu()
        if masked.shape != svd.s.shape:
            raise ConfigError(f"mask_fn gave {tuple(masked.shape)} for {path}, which has {len(svd.s)} directions")
        keep = (~masked).nonzero().reshape(-1).to(svd.s.device)
        if len(keep):
            kept = SVD(svd.u[:, keep], svd.s[keep], svd.v[:, keep], svd.total)
            a, b = split_factors(kept, len(keep), split)
        else:  # every direction masked: ΔW = 0 exactly, as a rank-1 pair with B = 0
            a, b = svd.v[:, :1].T.contiguous(), torch.zeros_like(svd.u[:, :1])
        factors[path] = (a, b)
        report[path] = {"rank": len(svd.s), "kept": len(keep), "masked": masked.nonzero().reshape(-1).tolist(),
                        "ratio": [round(float(r), 4) for r in scores.ratio]}
    if new_name == name:
        delete_adapter(model, name)
    attach_result(model, new_name, factors, like, trainable=True)
    return report


# ---- phase 2: task-vector negation ------------------------------------------------------------------------------
def negate(model: nn.Module, name: str, forget_name: str, new_name: str, lam: float = 1.0, method: str = "cat",
           target_rank: Optional[int] = None, energy: Optional[float] = None) -> dict:
    """Task-vector negation: adapter `new_name` with ΔW = ΔW_name − λ·ΔW_forget on every layer, exactly in delta space
    (`lorakit.compose.merge_adapters(model, [name, forget_name], [1, −λ], ...)`: "cat" is exact at rank r + r_f;
    "linear" re-factors, optionally truncated). `new_name == name` replaces `name`. Made active. Returns the merge's
    per-layer report."""
    lam = _finite(lam, "lam")
    _known(model, forget_name)
    if forget_name == name:
        raise ConfigError(f"negate needs two different adapters, got {name!r} twice")
    _check_new(model, name, new_name)
    if new_name != name:
        return _merge(model, [name, forget_name], [1.0, -lam], new_name, method, target_rank, energy)
    scratch = _free_name(model, f"{name}_negated")
    report = _merge(model, [name, forget_name], [1.0, -lam], scratch, method, target_rank, energy)
    delete_adapter(model, name)
    _rename(model, scratch, name)
    return report


def _free_name(model: nn.Module, stem: str) -> str:
    names, i, out = set(adapter_names(model)), 0, stem
    while out in names:
        i += 1
        out = f"{stem}{i}"
    return out


def _merge(model, names, weights, new_name, method, target_rank, energy) -> dict:
    from .merge import merge_adapters

    options = {k: v for k, v in (("target_rank", target_rank), ("energy", energy)) if v is not None}
    return merge_adapters(model, names, weights, new_name, method=method, trainable=True, **options)


def fit_adapter(model: nn.Module, new_name: str, config, data: Batches, steps: int = 50, lr: float = 1e-3,
                loss_fn: LossFn = lm_loss, under: Sequence[str] = (), weight_decay: float = 0.0,
                seed: Optional[int] = None) -> dict:
    """Inject a fresh adapter `new_name` (`config`, an AdapterConfig; its init drawn with torch seeded by `seed` when
    given) and train it on `data` with AdamW for `steps` (batches cycle), with the adapters `under` active beneath
    it and frozen (default: on the base model alone — the ΔW_forget of task-vector negation, or the "fresh LoRA"
    control of learned merging). Made active alone afterwards; removed again if training fails. Returns
    {"loss": [per step]}."""
    from ..config import AdapterConfig
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config must be a lorakit.AdapterConfig, got {type(config).__name__}")
    data = _batches(data, "data")
    _positive_int(steps, "steps", zero=True)
    _finite(lr, "lr", positive=True)
    _finite(weight_decay, "weight_decay")
    under = [under] if isinstance(under, str) else list(under)
    for n in under:
        _check_new(model, n, n)
    check_name(new_name)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        prepared = prepare(model, config, new_name)
    before = active_adapters(model)
    attach(model, prepared, trainable=True)
    set_active(model, [*under, new_name])
    try:
        losses = descend(model, trainable_tensors(model, new_name), data, loss_fn, steps, lr, weight_decay)
    except BaseException:
        delete_adapter(model, new_name)
        set_active(model, before)
        raise
    set_active(model, [new_name])
    return {"loss": losses}


# ---- phase 3: repair on the retain set -------------------------------------------------------------------------
def _forward(model, batch, hidden: bool):
    out = model(**model_inputs(batch), **({"output_hidden_states": True} if hidden else {}))
    logits = out.logits if hasattr(out, "logits") else out
    states = getattr(out, "hidden_states", None) if hidden else None
    if hidden and states is None:
        raise ConfigError("the model returns no hidden_states (output_hidden_states=True); use hidden_weight=0")
    return logits, states


def repair_loss(logits: torch.Tensor, ref_logits: torch.Tensor, states=None, ref_states=None,
                mask: Optional[torch.Tensor] = None, hidden_weight: float = 1.0,
                hidden_layers: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, KL, hidden): KL(p_ref ‖ p) at every masked position (mean), and the mean over `hidden_layers`
    (default: every entry of the states but the first, the embeddings) of Σ‖h − h_ref‖² / Σ‖h_ref‖²."""
    log_p = logits.float().log_softmax(-1)
    log_ref = ref_logits.float().log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_p)).sum(-1)
    weight = torch.ones_like(kl) if mask is None or mask.shape != kl.shape else mask.to(kl.dtype)
    kl = (kl * weight).sum() / weight.sum().clamp(min=1)
    hidden = kl.new_zeros(())
    if states is not None and hidden_weight:
        chosen = list(range(1, len(states))) if hidden_layers is None else list(hidden_layers)
        terms = []
        for i in chosen:
            h, h0 = states[i].float(), ref_states[i].float()
            w = weight if weight.shape == h.shape[:-1] else torch.ones(h.shape[:-1], device=h.device)
            err = ((h - h0).pow(2).sum(-1) * w).sum()
            terms.append(err / ((h0.pow(2).sum(-1) * w).sum()).clamp(min=1e-12))
        hidden = torch.stack(terms).mean()
    return kl + hidden_weight * hidden, kl, hidden


def repair(model: nn.Module, name: str, new_name: str, reference: Optional[str], retain: Batches, steps: int = 20,
           lr: float = 1e-3, kl_weight: float = 1.0, hidden_weight: float = 1.0,
           hidden_layers: Optional[Sequence[int]] = None) -> dict:
    """MAAT phase 3: AdamW on adapter `name`'s trainable tensors minimising kl_weight·KL(p_ref ‖ p_θ) +
    hidden_weight·(hidden-state error, `repair_loss`) on the `retain` batches (cycled), where p_ref / h_ref come from
    the model with adapter `reference` active (None: the base model) in a no-grad forward each step. The result is
    `new_name` (`new_name == name` edits `name` in place), made active. Returns {"kl": [per step], "hidden": [...],
    "loss": [...]} (values before each step)."""
    retain = _batches(retain, "retain")
    _positive_int(steps, "steps", zero=True)
    _finite(lr, "lr", positive=True)
    kl_weight = _finite(kl_weight, "kl_weight")
    hidden_weight = _finite(hidden_weight, "hidden_weight")
    if reference is not None:
        _known(model, reference)
        if reference == name and new_name == name:
            raise ConfigError("the reference adapter is the one being repaired in place; repair a copy")
    _check_new(model, name, new_name)
    trainable_tensors(model, name)
    work = _start(model, name, new_name)
    params = trainable_tensors(model, work)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hidden = hidden_weight != 0
    report = {"kl": [], "hidden": [], "loss": []}
    with only_trainable(model, params):
        for step in range(steps):
            batch = retain[step % len(retain)]
            with torch.no_grad():
                if reference is None:
                    with disabled(model):
                        ref_logits, ref_states = _forward(model, batch, hidden)
                else:
                    set_active(model, [reference])
                    ref_logits, ref_states = _forward(model, batch, hidden)
            set_active(model, [work])
            logits, states = _forward(model, batch, hidden)
            _, kl, hid = repair_loss(logits, ref_logits, states, ref_states, batch.get("attention_mask"),
                                     hidden_weight, hidden_layers)
            loss = kl_weight * kl + hidden_weight * hid
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report["kl"].append(float(kl.detach()))
            report["hidden"].append(float(hid.detach()))
            report["loss"].append(float(loss.detach()))
    set_active(model, [work])
    return report


def repair_divergence(model: nn.Module, name: str, reference: Optional[str], retain: Batches,
                      hidden_layers: Optional[Sequence[int]] = None) -> dict:
    """Mean KL(p_ref ‖ p_name) and hidden-state error over `retain` (no grad), as `repair` measures them."""
    retain = _batches(retain, "retain")
    kls, hids = [], []
    with torch.no_grad(), _active(model, [name]):
        for batch in retain:
            logits, states = _forward(model, batch, True)
            if reference is None:
                with disabled(model):
                    ref_logits, ref_states = _forward(model, batch, True)
            else:
                with _active(model, [reference]):
                    ref_logits, ref_states = _forward(model, batch, True)
            _, kl, hid = repair_loss(logits, ref_logits, states, ref_states, batch.get("attention_mask"), 1.0,
                                     hidden_layers)
            kls.append(float(kl))
            hids.append(float(hid))
    return {"kl": sum(kls) / len(kls), "hidden": sum(hids) / len(hids)}


# ---- the pipeline ----------------------------------------------------------------------------------------------
PHASES = {"ascent": ("steps", "lr", "project", "only_conflicts", "max_norm", "stop_at"),
          "prune": ("threshold", "fraction", "mask_fn", "split"),
          "negate": ("lam", "forget_adapter", "config", "steps", "lr", "method", "target_rank", "energy"),
          "repair": ("steps", "lr", "kl_weight", "hidden_weight", "hidden_layers")}


def maat(model: nn.Module, name: str, new_name: str, forget: Batches, retain: Batches, loss_fn: LossFn = lm_loss,
         ascent: Optional[dict] = None, prune: Optional[dict] = None, negation: Optional[dict] = None,
         repair_options: Optional[dict] = None, evaluate: bool = True) -> dict:
    """MAAT unlearning of `forget` from adapter `name`, keeping `retain`: the result is a new adapter `new_name`
    (made active; `name` is untouched and is the reference of the repair). Each phase runs when its options are given
    (a dict, `{}` for the defaults; None skips it), in this order:
    1. `ascent`: `projected_ascent` options (steps, lr, project, only_conflicts, max_norm, stop_at);
    2. `prune`: `svd_prune` options (threshold, fraction, mask_fn, split), then `negation`: `negate` options (lam,
       method, target_rank, energy) and the forget adapter: `forget_adapter` (the name of one on the model) or
       `config` (an AdapterConfig, fitted on `forget` by `fit_adapter` with `steps`, `lr` and deleted afterwards);
    3. `repair_options`: `repair` options (steps, lr, kl_weight, hidden_weight, hidden_layers), reference `name`.
    Returns {"forget_loss": {"before", "after"}, "retain_loss": {...} (when `evaluate`), one entry per phase run
    (its report), "ranks": {path: kept rank} and "pruned": {path: number of directions masked} when pruned}."""
    forget, retain = _batches(forget, "forget"), _batches(retain, "retain")
    chosen = {"ascent": ascent, "prune": prune, "negate": negation, "repair": repair_options}
    for phase, options in chosen.items():
        if options is None:
            continue
        if not isinstance(options, dict):
            raise ConfigError(f"options of phase {phase!r} must be a dict (or None to skip it), got {options!r}")
        unknown = sorted(set(options) - set(PHASES[phase]))
        if unknown:
            raise ConfigError(f"phase {phase!r} takes options {list(PHASES[phase])}, got unknown {unknown}")
    if negation is not None and (negation.get("forget_adapter") is None) == (negation.get("config") is None):
        raise ConfigError("negation needs exactly one of forget_adapter (an adapter's name) and config (to fit one)")
    if negation is not None and negation.get("forget_adapter") is not None:
        _check_new(model, negation["forget_adapter"], negation["forget_adapter"])
    _check_new(model, name, new_name)
    if new_name == name:
        raise ConfigError("maat writes a new adapter: new_name must differ from name (the repair's reference)")
    before_active = active_adapters(model)
    report: dict = {}
    if evaluate:
        report["forget_loss"] = {"before": mean_loss(model, _batches(forget, 'forget'), loss_fn, name)}
        report["retain_loss"] = {"before": mean_loss(model, _batches(retain, 'retain'), loss_fn, name)}
    fitted = None
    clone_adapter(model, name, new_name)
    try:
        if ascent is not None:
            report["ascent"] = projected_ascent(model, new_name, new_name, forget, retain, loss_fn=loss_fn, **ascent)
        if prune is not None:
            report["prune"] = svd_prune(model, new_name, new_name, forget, retain, **prune)
            report["ranks"] = {p: r["kept"] for p, r in report["prune"].items()}
            report["pruned"] = {p: len(r["masked"]) for p, r in report["prune"].items()}
        if negation is not None:
            options = dict(negation)
            forget_name = options.pop("forget_adapter", None)
            config = options.pop("config", None)
            fit = {k: options.pop(k) for k in ("steps", "lr") if k in options}
            if forget_name is None:
                fitted = forget_name = _free_name(model, f"{new_name}_forget")
                report["fit"] = fit_adapter(model, fitted, config, forget, loss_fn=loss_fn, **fit)
            report["negate"] = negate(model, new_name, forget_name, new_name, **options)
            if fitted is not None:
                delete_adapter(model, fitted)
                fitted = None
        if repair_options is not None:
            report["repair"] = repair(model, new_name, new_name, name, retain, **repair_options)
    except BaseException:
        for n in (new_name, fitted):
            if n is not None and n in adapter_names(model):
                delete_adapter(model, n)
        set_active(model, [n for n in before_active if n in adapter_names(model)])
        raise
    set_active(model, [new_name])
    if evaluate:
        report["forget_loss"]["after"] = mean_loss(model, _batches(forget, 'forget'), loss_fn, new_name)
        report["retain_loss"]["after"] = mean_loss(model, _batches(retain, 'retain'), loss_fn, new_name)
    return report


__all__ = ["project_out", "projected_ascent", "gradient_ascent", "svd_prune", "negate", "fit_adapter", "repair",
           "repair_loss", "repair_divergence", "maat", "clone_adapter", "lm_loss", "mean_loss", "model_inputs",
           "direction_energy", "DirectionScores", "threshold_mask", "fraction_mask", "trainable_tensors"]
