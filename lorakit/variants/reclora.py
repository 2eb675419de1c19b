"""RecLoRA's personalised LoRA (Zhu, Lin et al., arXiv 2408.03533): a bank of meta-LoRAs mixed per user by a gate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, RoutingError, StateDictError, TargetError
from ..kinds import LinearKind
from . import register_variant
from .base import Variant


class Gate(nn.Module):
    """u (rows, d_u) → mixing weights (rows, N): LayerNorm → Linear(d_u → hidden) → ReLU → Dropout → Linear(hidden → N)
    → softmax(·/τ) (or the raw logits when `softmax` is off)."""

    def __init__(self, user_dim: int, hidden: int, bank_size: int, dropout: float, temperature: float, softmax: bool):
        super().__init__()
        self.norm = nn.LayerNorm(user_dim)
        self.fc1 = nn.Linear(user_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, bank_size)
        self.temperature, self.softmax = temperature, softmax

    def reset_parameters(self) -> None:
        for m in (self.norm, self.fc1, self.fc2):
            m.reset_parameters()

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(self.norm(u)))))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        logits = self.logits(u)
        return torch.softmax(logits / self.temperature, dim=-1) if self.softmax else logits


@register_variant
class RecLoRA(Variant):
    """A bank of N meta-LoRAs {A_k (r×in), B_k (out×r)} per layer and a per-layer gate from a user representation u
    to mixing weights w (N): A_p = Σ_k w_k A_k, B_p = Σ_k w_k B_k and y = W·x + s·B_p·A_p·dropout(x), s = α/r
    (α/√r with rsLoRA) — (Σ w B)(Σ w A), not Σ w_k B_k A_k. Each user gets an adapter without a weight set of its
    own; served as per-request weights over the bank.

    The user representation comes from the routing object, not a global: `with lorakit.route(model,
    conditions={"user": u}):`, u float (R, d_u) with R = batch (one user per sequence, also in `generate()`),
    R = flattened tokens, or 1 (option `condition_key` names the condition read). Without it the forward raises
    RoutingError. u is detached before the gate (as the card's code: the user encoder is frozen), so only the bank
    and the gates train. Gate (card defaults): LayerNorm(d_u) → Linear(d_u → `gate_hidden` 60) → ReLU →
    Dropout(`gate_dropout` 0.1) → Linear(60 → `bank_size` 8) → softmax(·/`temperature` 1); `user_dim` d_u is required.

    Compute: x·[A_1; …; A_N]ᵀ as one matmul (N·r wide), weighted by w and summed over k in rank space (= A_p x),
    scaled, spread again as w_k·(s·A_p x) over the N blocks, then one matmul with [B_1 … B_N]; the cost is that of
    one rank-N·r LoRA plus O(N·r) per token. The gate runs once per condition row (per sequence for R = batch),
    not once per token, and its weights are broadcast over the row's tokens.

    Stored stacked (our file format, peft_type LORAKIT_RECLORA): `reclora_A` (N·r, in) with A_k its rows
    [k·r, (k+1)·r), `reclora_B` (out, N·r) with B_k its columns [k·r, (k+1)·r), and the gate as
    `reclora_gate.{norm,fc1,fc2}.{weight,bias}`; the gate's parameters are trained and saved with the adapter.
    Not mergeable (ΔW depends on the user): merge raises MergeError, no `factors()`, no export as a plain LoRA.
    Linear layers only (TargetError otherwise).

    Choices where the card is silent or [U]:
    - Init: every A_k is initialised as LoRA's A on its own (kaiming-uniform(a=√5) on (r, in), "gaussian": N(0, 1/r)),
      every B_k = 0 ⇒ ΔW = 0 for every user; the gate keeps PyTorch's default init (LayerNorm 1/0, Linear
      kaiming-uniform with uniform bias), as the reference code builds it with nn.Linear defaults.
    - Scale: one s = α/r for the mixed pair (r = each meta-LoRA's rank, not N·r), as the card's Δy.
    - `softmax=False` uses the raw gate logits as weights (the temperature then has no effect). The card's optional
      √ after the softmax, its "hard" top-2 variant and the per-token `which_in_gate='token'` gate ([x; u] input)
      are not implemented; per-token weights are available by passing u per token (R = tokens).
    - Gate dropout acts on the gate's per-row hidden units, so all tokens of a sequence share one dropout draw.
    - LoRA dropout (`lora_dropout`) applies to x before the bank, as LoRA's.
    """

    name = "reclora"
    peft_type = "LORAKIT_RECLORA"
    mergeable = False
    uses_base_out = False
    reads_routing = True
    pair_refusal = "its ΔW depends on the user: the mixing weights come from the routing's condition"

    @dataclass
    class Options:
        user_dim: Optional[int] = None  # d_u, width of the condition vectors (required)
        bank_size: int = 8  # N meta-LoRAs per layer
        gate_hidden: int = 60
        gate_dropout: float = 0.1
        temperature: float = 1.0  # softmax(logits / τ)
        condition_key: str = "user"  # which condition of the routing holds u
        softmax: bool = True  # False: the raw gate logits are the weights

        def __post_init__(self):
            def whole(name, value):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"option {name} must be a positive integer, got {value!r}")
            if self.user_dim is None:
                raise ConfigError("variant 'reclora' needs option user_dim: the width d_u of the user vectors the "
                                  "gate reads (lorakit.route(model, conditions={'user': u}) with u shaped (rows, d_u))")
            whole("user_dim", self.user_dim)
            whole("bank_size", self.bank_size)
            whole("gate_hidden", self.gate_hidden)
            p = self.gate_dropout
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"option gate_dropout must be in [0, 1), got {p!r}")
            t = self.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
                raise ConfigError(f"option temperature must be a positive finite number, got {t!r}")
            if not isinstance(self.condition_key, str) or not self.condition_key:
                raise ConfigError(f"option condition_key must be a non-empty string, got {self.condition_key!r}")
            if not isinstance(self.softmax, bool):
                raise ConfigError(f"option softmax must be true or false, got {self.softmax!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        if type(kind) is not LinearKind:
            raise TargetError(f"reclora adapts Linear layers only; {self.path!r} is a {type(kind.base).__name__}")
        o = self.opts
        self.bank_size = o.bank_size
        self.reclora_A = nn.Parameter(torch.empty(o.bank_size * r, kind.in_features))
        self.reclora_B = nn.Parameter(torch.empty(kind.out_features, o.bank_size * r))
        self.reclora_gate = Gate(o.user_dim, o.gate_hidden, o.bank_size, o.gate_dropout, o.temperature, o.softmax)
        self.bind_routing(None)

    def initialize(self, how):
        r = self.r
        for k in range(self.bank_size):  # each meta-LoRA as a LoRA of rank r (not one of rank N·r)
            self.kind.init_factors(self.reclora_A[k * r:(k + 1) * r], self.reclora_B[:, k * r:(k + 1) * r], how)
        self.reclora_gate.reset_parameters()

    def file_tensors(self):
        g = self.reclora_gate
        return {"reclora_A": self.reclora_A, "reclora_B": self.reclora_B,
                **{f"reclora_gate.{m}.{p}": getattr(getattr(g, m), p)
                   for m in ("norm", "fc1", "fc2") for p in ("weight", "bias")}}

    @property
    def lora_dtype(self):
        return self.reclora_A.dtype

    def bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-LoRAs as (N, r, in) and (N, out, r) views: A_k = bank()[0][k], B_k = bank()[1][k]."""
        return split_bank(self.reclora_A, self.reclora_B, self.bank_size)

    # ---- routing ---------------------------------------------------------------------------------
    def bind_routing(self, routing, rows=None, total_rows=None) -> None:
        """Called by the adapted layer before each call: the routing and which rows of the input it covers."""
        self._routing = (routing, rows, total_rows)

    def __getstate__(self):  # copies (deepcopy, pickle) do not carry the routing of a past call
        return {**super().__getstate__(), "_routing": (None, None, None)}

    def gate_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Mixing weights (rows, N) for user vectors u (rows, d_u), u detached."""
        d = self.opts.user_dim
        if u.shape[-1] != d:
            raise RoutingError(f"reclora on {self.path!r} reads {self.opts.condition_key!r} vectors of width "
                               f"user_dim={d}, the routing's condition has width {u.shape[-1]}")
        return self.reclora_gate(u.detach())

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing weights for the tokens of `x`, shaped x.shape[:-1] + (N,)."""
        routing, rows, total = self._routing
        key = self.opts.condition_key
        if routing is None or key not in routing.conditions:
            raise RoutingError(f"reclora on {self.path!r} needs the user representation {key!r}: run the model inside "
                               f"lorakit.route(model, conditions={{{key!r}: u}}) with u shaped (rows, "
                               f"{self.opts.user_dim}), rows = batch, tokens or 1")
        return routing.condition(key, x, rows, total, fn=self.gate_weights)

    # ---- forward ---------------------------------------------------------------------------------
    def delta(self, x, base_out):
        w = self.token_weights(x)
        n, r = self.bank_size, self.r
        h = F.linear(self.dropout(x), self.reclora_A).unflatten(-1, (n, r))  # (..., N, r): A_k x for every k
        w = w.to(h.dtype).unsqueeze(-1)  # (..., N, 1)
        z = (h * w).sum(-2) * self.scale  # (..., r): s·A_p x
        return F.linear((w * z.unsqueeze(-2)).flatten(-2), self.reclora_B)  # Σ_k w_k B_k (s·A_p x) = s·B_p A_p x

    def extra_repr(self) -> str:
        o = self.opts
        return (f"r={self.r}, bank_size={o.bank_size}, user_dim={o.user_dim}, gate_hidden={o.gate_hidden}, "
                f"scale={self.scale:g}")


def split_bank(a: torch.Tensor, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked `reclora_A` (N·r, in) and `reclora_B` (out, N·r) as the N meta-LoRAs: (N, r, in) and (N, out, r)
    views; ValueError when the shapes are not a bank of n."""
    r = a.shape[0] // n
    if r < 1 or a.shape[0] != r * n or b.shape[1] != a.shape[0]:
        raise ValueError(f"reclora_A {tuple(a.shape)} and reclora_B {tuple(b.shape)} are not a bank of {n}")
    return a.view(n, r, -1), b.view(-1, n, r).permute(1, 0, 2)


def read_bank(folder) -> tuple:
    """(config, options, tensors) of a saved RecLoRA adapter; ConfigError when the folder holds another variant."""
    from ..io.files import read_adapter

    config, tensors = read_adapter(folder)
    if config.variant != RecLoRA.name:
        raise ConfigError(f"{folder} holds a {config.variant!r} adapter, not a RecLoRA bank")
    return config, RecLoRA.parse_options(config.options), tensors


@torch.no_grad()
def personal_lora(bank, user, directory) -> Path:
    """Write one user's adapter from a saved RecLoRA bank (folder `bank`) as a plain PEFT LoRA folder `directory`.

    Per layer: w = gate(u) (eval: no dropout), A_p = Σ_k w_k A_k, B_p = Σ_k w_k B_k, written as lora_A = A_p and
    lora_B = s·B_p with lora_alpha = r (the scale folded in, as `export_lora`), so the folder's ΔW = s·B_p·A_p is
    what the bank computes for u, exactly up to float32 rounding; `modules_to_save` tensors are copied. `user`: d_u
    numbers (one user). This is how a server serves per-request weights over the bank with its plain LoRA kernels.
    Raises ConfigError for a folder that is not a RecLoRA bank or a user vector of the wrong width / non-finite.
    """
    from ..io.export import plain_config
    from ..io.files import write_folder

    config, o, tensors = read_bank(bank)
    u = torch.as_tensor(user, dtype=torch.float32).reshape(-1)
    if u.numel() != o.user_dim or not torch.isfinite(u).all():
        raise ConfigError(f"the bank in {bank} reads user vectors of {o.user_dim} finite numbers, got "
                          f"{u.numel()} numbers" + ("" if torch.isfinite(u).all() else " with NaN or Inf"))
    out, ranks = {}, {}
    for key in tensors:
        if not key.endswith(".reclora_A"):
            continue
        path = key[:-len(".reclora_A")]
        gate = Gate(o.user_dim, o.gate_hidden, o.bank_size, o.gate_dropout, o.temperature, o.softmax).eval()
        try:
            a, b = split_bank(tensors[key].float(), tensors[f"{path}.reclora_B"].float(), o.bank_size)
            gate.load_state_dict({k[len(f"{path}.reclora_gate."):]: t.float() for k, t in tensors.items()
                                  if k.startswith(f"{path}.reclora_gate.")})
        except (KeyError, RuntimeError, ValueError) as e:
            raise StateDictError(f"{bank}: the bank on {path} is incomplete or malformed: {e}") from None
        w = gate(u[None])[0]  # (N,)
        out[f"{path}.lora_A.weight"] = torch.einsum("k,kri->ri", w, a)
        out[f"{path}.lora_B.weight"] = torch.einsum("k,kor->or", w, b) * config.scale_for(path)
        ranks[path] = a.shape[1]
    out.update({k: t for k, t in tensors.items() if ".reclora_" not in k})  # modules_to_save
    return Path(write_folder(directory, plain_config(ranks, config), out))
