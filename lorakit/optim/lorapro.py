"""LoRA-Pro (Wang et al., ICLR 2025), mode `lora-pro-full` of the reference: full-space Adam on the equivalent gradient.

Conventions: ΔW = s·B·A, B (m×r), A (r×n), s the adapter's real scale (α/r, α/√r for rsLoRA, ...); G = ∂L/∂W; the
plain LoRA gradients are g_A = s·BᵀG, g_B = s·G·Aᵀ. For each adapter, per step:
1. adjusted gradients with X = 0:  g_A* = (BᵀB)⁻¹g_A / s²,  g_B* = (I − P_B)·g_B·(AAᵀ)⁻¹ / s²; their equivalent
   gradient g̃ = s(B·g_A* + g_B*·A) equals P_B·G + (I − P_B)·G·P_A (the best approximation of G the pair can reach);
2. Adam on g̃ in the full m×n space (state `exp_avg`, `exp_avg_sq` of shape m×n, bias-corrected): U = m̂/(√v̂ + ε);
3. map U back (g_A ← s·BᵀU, g_B ← s·U·Aᵀ), adjust again with the Sylvester X of
   (BᵀB)X + X(AAᵀ) = −(BᵀB)⁻¹·g_A·Aᵀ / s²  (X keeps the adjusted gradients closest to the raw ones), and take the
   plain step p ← p − lr·g* (the reference's outer SGD). Optional decoupled weight decay (default 0 as there)
   shrinks each factor by √(1 − lr·wd) before the step, so that B·A (i.e. ΔW) shrinks by (1 − lr·wd) as the
   reference does.
Inverses are pinv(M + 1e-8·I) as in the reference; r×r algebra runs in float64 (cheap), the Sylvester equation by the
eigendecompositions of the two symmetric r×r matrices. When B = 0 this is the reference's first-step form.

Which adapters: A is paired with B through the model's modules, never by parameter order, and each variant says
through `Variant.trained_pairs()` which factors the step moves, at which scale:
ΔW = const + s·B[:, ranks]·diag(w)·A[ranks]. So PiSSA, OLoRA and LoRA-GA (a frozen offset plus trainable A, B),
DyLoRA (this step's truncation at its sampled rank b, scale s·r/b; in frozen mode component b alone),
MatryoshkaLoRA (A' = diag(P)·A: the adjusted gradient of A' is mapped back through diag(P)⁻¹) and both branches of
MM-LoRA (each branch's full-weight gradient is the part of G from its own tokens) get the closed form. An adapter
whose ΔW is not of that form (DoRA, SoRA's gate, VeRA, a hypernetwork, ...) is refused with an
UnsupportedFeatureError naming it and why: never a silent fallback to AdamW. Trainable parameters outside the
adapters (a classification head, biases) get plain AdamW with the same settings.
State holds only tensors, so checkpoints reload with `weights_only=True`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from . import register_optimizer, trained_adapters
from .standard import trainable

JITTER = 1e-8
_OPTIONS = ("weight_decay",)


def _pinv(m: torch.Tensor) -> torch.Tensor:
    m = m.double()
    return torch.linalg.pinv(m + JITTER * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))


def solve_sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with P·X + X·Q = C for symmetric positive semi-definite P, Q (r×r); components where P's and Q's
    eigenvalues both vanish (left undetermined) are set to 0."""
    lp, u = torch.linalg.eigh(p.double())
    lq, v = torch.linalg.eigh(q.double())
    denom = lp[:, None] + lq[None, :]
    f = u.T @ c.double() @ v
    tiny = 1e-30 * max(1.0, float(denom.abs().max()))
    y = torch.where(denom.abs() > tiny, f / torch.where(denom.abs() > tiny, denom, torch.ones_like(denom)),
                    torch.zeros_like(f))
    return (u @ y @ v.T).to(c.dtype)


def adjusted_gradients(a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, s: float,
                       sylvester: bool = True):
    """(g_A*, g_B*, X) for factors A (r×n), B (m×r), raw gradients g_A (r×n), g_B (m×r) and scale s. With
    `sylvester=False`, X = 0 (returned as zeros)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b, g_a, g_b = (t.to(dtype) for t in (a, b, g_a, g_b))
    btb_inv = _pinv(b.T @ b)
    aat_inv = _pinv(a @ a.T).to(dtype)
    g_a_star = (btb_inv.to(dtype) @ g_a) / s ** 2
    gb_aat = g_b @ aat_inv
    g_b_star = (gb_aat - b @ (btb_inv.to(dtype) @ (b.T @ gb_aat))) / s ** 2  # (I − P_B) g_B (AAᵀ)⁻¹ / s²
    r = a.shape[0]
    if not sylvester:
        return g_a_star, g_b_star, torch.zeros(r, r, dtype=dtype, device=a.device)
    rhs = -(btb_inv @ (g_a.double() @ a.T.double())) / s ** 2
    x = solve_sylvester(b.T @ b, a @ a.T, rhs).to(dtype)
    return g_a_star + x @ a, g_b_star - b @ x, x


class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro over `model`'s trainable parameters (see the module doc). Works in any torch loop:
    `loss.backward(); opt.step()`."""

    def __init__(self, model: nn.Module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        params = trainable(model)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.adapters = trained_adapters(model, "lorapro")
        self._paired = {id(p) for _, v in self.adapters for pair in v.trained_pairs() for p in (pair.a, pair.b)}

    @staticmethod
    def _adam(state: dict, g: torch.Tensor, beta1, beta2, eps) -> torch.Tensor:
        """Advance `state` (step already counted) with gradient g; the bias-corrected Adam direction m̂/(√v̂ + ε)."""
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = int(state["step"])
        return (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt_().add_(eps))

    def _pair_step(self, pair, lr, beta1, beta2, eps, wd) -> None:
        pa, pb, s, ranks = pair.a, pair.b, float(pair.scale), pair.ranks
        if pa.grad is None and pb.grad is None:
            return
        a_rows, b_cols = pa.flatten(1)[ranks], pb.flatten(1)[:, ranks]  # views: the step writes through them
        a, b = a_rows.detach().clone(), b_cols.detach().clone()
        g_a = pa.grad.flatten(1)[ranks] if pa.grad is not None else torch.zeros_like(a)
        g_b = pb.grad.flatten(1)[:, ranks] if pb.grad is not None else torch.zeros_like(b)
        w = None if pair.weights is None else pair.weights.to(torch.promote_types(a.dtype, torch.float32))[:, None]
        if w is not None:  # work on A' = diag(w)·A, whose gradient is diag(w)⁻¹·g_A
            a, g_a = w * a, g_a / w
        ga_star, gb_star, _ = adjusted_gradients(a, b, g_a, g_b, s, sylvester=False)
        equiv = s * (b.to(ga_star.dtype) @ ga_star + gb_star @ a.to(gb_star.dtype))  # m×n
        state = self.state[pa]  # the pair's full-space state lives with A
        state["step"] = state.get("step", torch.tensor(0.0)) + 1
        u = self._adam(state, equiv, beta1, beta2, eps)
        new_a, new_b, _ = adjusted_gradients(a, b, s * (b.to(u.dtype).T @ u), s * (u @ a.to(u.dtype).T), s)
        if w is not None:
            new_a = new_a / w  # back from A' to A
        for rows, g in ((a_rows, new_a), (b_cols, new_b)):
            if wd:
                rows.mul_(math.sqrt(1 - lr * wd))
            rows.add_(g.to(rows.dtype), alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for _, v in self.adapters:
            for pair in v.trained_pairs():
                self._pair_step(pair, lr, beta1, beta2, eps, wd)
        for p in group["params"]:  # the rest: AdamW
            if id(p) in self._paired or p.grad is None:
                continue
            state = self.state[p]
            state["step"] = state.get("step", torch.tensor(0.0)) + 1
            u = self._adam(state, p.grad.to(torch.promote_types(p.dtype, torch.float32)), beta1, beta2, eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(u.to(p.dtype), alpha=-lr)
        return loss


@register_optimizer("lorapro")
def lorapro(model, args, **options):
    """LoRA-Pro with args' lr, Adam betas and epsilon. Option: weight_decay (≥ 0, decoupled; default
    args.weight_decay, 0 unless set, as in the reference whose outer SGD has none)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown lorapro option(s) {unknown}; known: {list(_OPTIONS)}")
    wd = options.get("weight_decay", args.weight_decay)
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise ConfigError(f"optim option weight_decay must be a finite number ≥ 0, got {wd!r}")
    return LoRAPro(model, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                   weight_decay=float(wd))
