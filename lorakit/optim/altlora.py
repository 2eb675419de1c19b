"""AltLoRA / AltLoRA+ (Yu et al. 2025, arXiv 2505.12455): preconditioned factor updates, momentum kept in low-rank space.

Card: training.md §2. For each LoRA pair (A: r×n, B: m×r), with ρ = `reg`:
    ĝ_A = (BᵀB + ρI)⁻¹ ∇_A                          ĝ_B = ∇_B (AAᵀ + ρI)⁻¹
    m_A ← β1·(BᵀB+ρI)⁻¹ Bᵀ B_prev·m_A + (1−β1)·ĝ_A   m_B ← β1·m_B·A_prev Aᵀ (AAᵀ+ρI)⁻¹ + (1−β1)·ĝ_B
    θ ← θ − η/(1−β1^t)·m          (AltLoRA+: θ ← θ − η/(1−β1^t)·m/(√v+ε), v ← β2 v + (1−β2) ĝ², no β2 correction)
    θ ← θ − ηλθ                   (decoupled weight decay)
B_prev / A_prev is the other factor as it was when this factor's momentum was last updated (the basis the momentum
is expressed in); t counts this factor's own updates.

Modes (option `mode`):
- "sequential" (default; the reference's `lora_alt=False`): both factors every step from one backward pass, A first;
  B's preconditioner and transport use the freshly updated A (Gauss-Seidel).
- "alternating" (the reference's `alt=True`): only A is updated for `alter_freq` optimizer steps, then only B, and so
  on. The idle factor's gradient is ignored (freezing it as the reference trainer does saves its backward).
  `start` ("A", the reference's order, or "B") picks the first factor: with B = 0 at init, ĝ_A = 0, so the first
  `alter_freq` steps of an A-first run move nothing.

Choices where the card is silent or the reference is quirky:
- No 1/s² factor (as the reference code); the adapter's scale only enters through the gradients.
- AltLoRA+ stores the transported momentum (the reference stores the untransported one and transports only the
  numerator); we keep one consistent low-rank momentum for both algorithms.
- ε and β come from TrainingArguments (`adam_epsilon`, `adam_beta1/2`); the reference used ε = 1e-4, pass
  `optim_args={"eps": 1e-4}` to match. ρ defaults to 1e-5 (the reference trainer's value).
- A and B are paired by module (`AdaptedLayer.adapters[name].lora_A/.lora_B`), never by parameter order. Conv
  factors are handled through their matrix views. Only adapters whose step moves one whole pair, ΔW = const + s·B·A
  (LoRA, PiSSA, OLoRA, LoRA-GA; `Variant.trained_pairs`), are accepted; any other adapter (DoRA, SoRA's gate,
  DyLoRA's sampled truncation, MatryoshkaLoRA's diagonal, ...) is refused by name, as in LoRA-Pro. Trainable
  parameters outside the adapters (a head, biases) get plain AdamW with the same hyperparameters.
- The math runs in fp32 (fp64 for fp64 factors) and is written back in the parameter's dtype.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, TrainingError, UnsupportedFeatureError
from . import register_optimizer, trained_adapters

MODES = ("sequential", "alternating")


def _inv(gram: torch.Tensor, reg: float) -> torch.Tensor:
    return torch.linalg.inv(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


class AltLoRA(torch.optim.Optimizer):
    """Group 0 holds the paired factors (A0, B0, A1, B1, ...), group 1 (if any) the other trainable parameters."""

    def __init__(self, pairs, others, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, reg=1e-5,
                 mode="sequential", alter_freq=10, start="A", plus=False):
        self.kinds = [v.kind for v in pairs]
        params = [p for v in pairs for p in (v.lora_A, v.lora_B)]
        groups = [dict(params=params, role="pairs", global_step=0)]
        if others:
            groups.append(dict(params=list(others), role="others"))
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, reg=reg,
                                      mode=mode, alter_freq=alter_freq, start=start, plus=plus))

    def phase(self) -> str:
        """Which factor(s) the next step updates: "both", "A" or "B"."""
        g = self.param_groups[0]
        if g["mode"] == "sequential":
            return "both"
        first = g["global_step"] // g["alter_freq"] % 2 == 0
        return g["start"] if first else {"A": "B", "B": "A"}[g["start"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        phase = self.phase()
        ps = group["params"]
        for i, kind in enumerate(self.kinds):
            a, b = ps[2 * i], ps[2 * i + 1]
            if phase in ("both", "A") and a.grad is not None:
                self._update(group, a, kind, b, "A")
            if phase in ("both", "B") and b.grad is not None:
                self._update(group, b, kind, a, "B")
        group["global_step"] += 1
        for g in self.param_groups[1:]:
            self._adamw(g)
        return loss

    def _update(self, group, p, kind, other, which):
        beta1, beta2 = group["betas"]
        lr, reg, eps, wd = group["lr"], group["reg"], group["eps"], group["weight_decay"]
        dt = torch.promote_types(p.dtype, torch.float32)
        x = kind.matrix(p).to(dt)
        g = kind.matrix(p.grad).to(dt)
        o = kind.matrix(other).to(dt)  # B (m×r) when updating A, A (r×n) when updating B
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(x)
            state["prev_other"] = o.clone()
            if group["plus"]:
                state["exp_avg_sq"] = torch.zeros_like(x)
        m, prev = state["exp_avg"], state["prev_other"]
        if which == "A":
            pre = _inv(o.T @ o, reg)                   # (BᵀB + ρI)⁻¹
            ghat = pre @ g
            m.copy_(pre @ (o.T @ (prev @ m)))          # transport: (BᵀB+ρI)⁻¹ Bᵀ B_prev m_A
        else:
            pre = _inv(o @ o.T, reg)                   # (AAᵀ + ρI)⁻¹
            ghat = g @ pre
            m.copy_(((m @ prev) @ o.T) @ pre)          # transport: m_B A_prev Aᵀ (AAᵀ+ρI)⁻¹
        m.mul_(beta1).add_(ghat, alpha=1 - beta1)
        prev.copy_(o)
        state["step"] += 1
        direction = m / (1 - beta1 ** state["step"])
        if group["plus"]:
            v = state["exp_avg_sq"]
            v.mul_(beta2).addcmul_(ghat, ghat, value=1 - beta2)
            direction = direction / (v.sqrt() + eps)
        new = x - lr * direction
        if wd:
            new = new - lr * wd * new
        kind.matrix(p).copy_(new.to(p.dtype))

    def _adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t, g = state["step"], p.grad.float()
            state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            x = p.float() * (1 - group["lr"] * group["weight_decay"])
            p.copy_((x - group["lr"] / (1 - beta1 ** t) * state["exp_avg"] / denom).to(p.dtype))


def _build(model, args, plus, options):
    opts = dict(reg=1e-5, mode="sequential", alter_freq=10, start="A", eps=args.adam_epsilon)
    for key, value in options.items():
        if key not in opts:
            raise ConfigError(f"unknown {'altlora+' if plus else 'altlora'} option {key!r}; known: {sorted(opts)}")
        opts[key] = value
    if opts["mode"] not in MODES:
        raise ConfigError(f"option mode must be one of {MODES}, got {opts['mode']!r}")
    if opts["start"] not in ("A", "B"):
        raise ConfigError(f"option start must be 'A' or 'B', got {opts['start']!r}")
    if isinstance(opts["alter_freq"], bool) or not isinstance(opts["alter_freq"], int) or opts["alter_freq"] < 1:
        raise ConfigError(f"option alter_freq must be a positive integer, got {opts['alter_freq']!r}")
    for key in ("reg", "eps"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], (int, float)) or opts[key] < 0:
            raise ConfigError(f"option {key} must be a non-negative number, got {opts[key]!r}")
    name = "altlora+" if plus else "altlora"
    pairs = [v for _, v in trained_adapters(model, name)]
    for v in pairs:
        form = v.trained_pairs()
        if len(form) != 1 or form[0].weights is not None or form[0].ranks != slice(None):
            raise UnsupportedFeatureError(f"{name} cannot train a {v.name!r} adapter ({v.path!r}): its "
                                          "preconditioners need one whole pair (lora_A, lora_B) moved every step")
    if not pairs:
        raise TrainingError("altlora needs LoRA adapters with trainable lora_A/lora_B factors; none found")
    paired = {id(p) for v in pairs for p in (v.lora_A, v.lora_B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    return AltLoRA(pairs, others, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                   weight_decay=args.weight_decay, plus=plus, **opts)


@register_optimizer("altlora")
def altlora(model, args, **options):
    return _build(model, args, False, options)


@register_optimizer("altlora+")
def altlora_plus(model, args, **options):
    return _build(model, args, True, options)
