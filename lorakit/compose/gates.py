"""Gates: per-layer, per-token weights over frozen adapters, for `lorakit.route(model, weights=gate, ...)`.

A gate is called by every adapted layer as `gate(path, x)` with the layer's path and its input as (tokens, features)
and returns (tokens, n) weights over its `names`; the layer adds Σᵢ wᵢ·ΔWᵢx to its base output.

- `ArrowGate` (Ostapenko et al. 2024; PEFT's `create_arrow_model`): data-free. Each adapter's prototype in a layer is
  the top right singular vector of its ΔW = B·A (PEFT's 15 power iterations on Aᵀ(BᵀB)A from one seeded start, or
  the exact one); logits |x·vᵢ| on the raw input, the `top_k` largest kept, softmax at `temperature`.
- `LayerGate` (LoRA-Flow, Wang et al. 2024): trainable. Per transformer block l, w = softmax(W_l h / T) + b_l from
  the hidden state h entering the block, shared by every adapted layer in it. W_l and b_l start at 0, so training
  starts from the uniform mixture (the card's b init for two adapters is [−0.5, 0.5]; we start unbiased for any n).
  Adapted layers outside the blocks get the uniform mixture.
- `FusionGate` (AutoLoRA, Li et al. 2025): trainable, per channel. In each adapted layer, from the base output h and
  each adapter's output Δhᵢ: gᵢ = σ(w_lora⊙LN(Δhᵢ) + w_cross⊙(LN(h)⊙LN(Δhᵢ)) + b [+ b_t]), output h + Σᵢ w_out⊙gᵢ⊙Δhᵢ,
  with w_lora, w_cross, b, w_out ∈ R^{d_out} per layer (shared by the adapters; w_out starts at 0.512, the others
  from randn, as the authors' code). [U] choices: LN is a plain (affine-free) layer norm over channels for both terms
  (the code's second LN is not released); Δhᵢ includes the adapter's scale; timesteps enter, when `timesteps=K`, as
  a learned per-layer bias b_t for the bucket set by `set_timestep(k)` (the t-aware merger is unreleased).
- `MoleGate` (MoLE, Wu et al. 2024, at layer granularity): trainable. Per adapted layer, from each adapter's output
  Δhᵢ: εᵢ = LN(Δhᵢ)·e, weights softmax(ε/τ) over the adapters per token, output h + Σᵢ wᵢ·Δhᵢ; e ∈ R^{d_out} starts
  at 0 (the uniform mixture), τ is learned (through log τ, starting at 1). [U] the paper gates whole blocks' outputs
  and adds a load-balancing loss; here layers are the unit (the routing's) and `balance_loss()` gives −Σᵢ log q̄ᵢ
  over the mean gate mass q̄ of the forwards since the last call (with `record_balance=True`), to add to a loss by
  hand (the Trainer's loss has no hook for it).

`with gated(model, gate):` routes the model through the gate and makes the gate the model's only trainable part
(registered as `model.lorakit_gate`, so `lorakit.train.Trainer` and `model.parameters()` see it); everything is
restored on exit.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, RoutingError
from ..kinds import ConvKind, EmbeddingKind
from ..layers import AdaptedLayer
from ..model import adapter_names, check_names, wrappers
from ..routing import route

GATE_ATTR = "lorakit_gate"


def _check_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    names, known = check_names(names, "a gate"), adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"gate adapters must be distinct names this model has ({known}), got {names}")
    return names


def _layers_holding(model: nn.Module, names: Sequence[str]):
    """(path, adapted layer) for every layer of `model` holding at least one of the adapters `names`."""
    return [(path, layer) for path, layer in wrappers(model)
            if isinstance(layer, AdaptedLayer) and any(n in layer.adapters for n in names)]


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor, iterations: Optional[int] = 15,
                              seed: int = 0) -> torch.Tensor:
    """The top right singular vector of B·A (in fp32, unit norm, sign arbitrary) without forming B·A: `iterations`
    power iterations on Aᵀ(BᵀB)A from a start drawn with `seed` (PEFT's Arrow), or exact (QR of Aᵀ and an SVD of the
    small core) when `iterations` is None."""
    a, b = a.detach().float(), b.detach().float()
    if iterations is None:
        q, r = torch.linalg.qr(a.T)  # A = Rᵀ Qᵀ, so B·A = (B Rᵀ) Qᵀ
        _, _, vh = torch.linalg.svd(b @ r.T, full_matrices=False)
        return q @ vh[0]
    gen = torch.Generator(device=a.device.type).manual_seed(seed)
    v = torch.randn(a.shape[1], generator=gen, device=a.device)
    v = v / (v.norm() + 1e-8)
    gram = b.T @ b
    for _ in range(iterations):
        w = a.T @ (gram @ (a @ v))
        v = w / (w.norm() + 1e-8)
    return v


class ArrowGate(nn.Module):
    """Arrow routing over the adapters `names` of `model` (see the module docstring). Prototypes are built once,
    here; build a new gate after changing the adapters."""

    def __init__(self, model: nn.Module, names: Sequence[str], top_k: int = 3, temperature: float = 1.0,
                 power_iterations: Optional[int] = 15, seed: int = 0):
        super().__init__()
        self.names = _check_names(model, names)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(self.names):
            raise ConfigError(f"top_k must be an int in [1, {len(self.names)}] (the number of adapters), got {top_k!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.top_k, self.temperature = top_k, float(temperature)
        self.prototypes: dict[str, torch.Tensor] = {}  # path → (n, in); rows of adapters a layer lacks are NaN
        for path, layer in _layers_holding(model, self.names):
            if isinstance(layer.kind, (ConvKind, EmbeddingKind)):
                raise ConfigError(f"Arrow routes linear layers only; {path} is a {type(layer.base_layer).__name__} "
                                  "(leave it out of the adapters' target_modules)")
            rows = []
            for n in self.names:
                factors = layer.adapters[n].factors() if n in layer.adapters else None
                if n in layer.adapters and factors is None:
                    raise ConfigError(f"Arrow needs ΔW = s·B·A; adapter {n!r} ({layer.adapters[n].name}) at {path} "
                                      "has no such factored form")
                rows.append(None if factors is None else
                            top_right_singular_vector(factors[0], factors[1], power_iterations, seed))
            width = next(r for r in rows if r is not None).numel()
            self.prototypes[path] = torch.stack([torch.full((width,), math.nan) if r is None else r for r in rows])

    def forward(self, path: str, x: torch.Tensor) -> torch.Tensor:
        protos = self.prototypes.get(path)
        if protos is None:
            raise RoutingError(f"Arrow has no prototypes for layer {path!r}; build the gate on this model")
        protos = protos.to(x.device)
        logits = (x.float() @ protos.nan_to_num().T).abs()
        logits = logits.masked_fill(protos.isnan().any(1), -math.inf)  # adapters this layer lacks never win
        k = min(self.top_k, int((~protos.isnan().any(1)).sum()))
        top, index = logits.topk(k, dim=1)
        kept = torch.full_like(logits, -math.inf).scatter(1, index, top)
        return torch.softmax(kept / self.temperature, dim=1)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The longest `nn.ModuleList` whose entries hold adapted layers (a decoder's layers), as (path, block)."""
    best: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            blocks = [(f"{path}.{i}" if path else str(i), b) for i, b in enumerate(module)]
            if all(any(isinstance(m, AdaptedLayer) for m in b.modules()) for _, b in blocks):
                best = blocks
    if not best:
        raise ConfigError("found no list of blocks holding adapted layers (a transformer's layers) for a LayerGate")
    return best


class LayerGate(nn.Module):
    """LoRA-Flow's gate over the adapters `names` (see the module docstring): one Linear(hidden → n) and one bias
    per transformer block of `model`, fed the hidden state entering the block. Attach with `gated(model, gate)`."""

    def __init__(self, model: nn.Module, names: Sequence[str], temperature: float = 1.0,
                 hidden_size: Optional[int] = None):
        super().__init__()
        self.names = _check_names(model, names)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.block_paths = [p for p, _ in transformer_blocks(model)]
        hidden = hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ConfigError("LayerGate needs hidden_size= (the model has no config.hidden_size)")
        n = len(self.names)
        self.proj = nn.ModuleList(nn.Linear(hidden, n, bias=False) for _ in self.block_paths)
        for p in self.proj:
            nn.init.zeros_(p.weight)
        self.bias = nn.Parameter(torch.zeros(len(self.block_paths), n))
        self._current: dict[int, torch.Tensor] = {}
        self._block_of: dict[str, Optional[int]] = {}

    def attach(self, model: nn.Module) -> list:
        """Hooks that compute each block's weights from its input hidden state; returns their handles."""
        modules = dict(model.named_modules())
        missing = [p for p in self.block_paths if p not in modules]
        if missing:
            raise ConfigError(f"this gate was built for another model: no blocks {missing[:3]}")
        return [modules[p].register_forward_pre_hook(self._hook(i), with_kwargs=True)
                for i, p in enumerate(self.block_paths)]

    def _hook(self, i: int):
        def compute(block, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            h = h.reshape(-1, h.shape[-1])
            proj = self.proj[i]
            logits = proj(h.to(proj.weight.dtype)) / self.temperature
            self._current[i] = torch.softmax(logits, dim=-1) + self.bias[i]
        return compute

    def forward(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path not in self._block_of:
            self._block_of[path] = next((i for i, p in enumerate(self.block_paths) if path.startswith(p + ".")), None)
        i = self._block_of[path]
        if i is None:
            return x.new_full((x.shape[0], len(self.names)), 1.0 / len(self.names), dtype=self.bias.dtype)
        if i not in self._current:
            raise RoutingError(f"LayerGate has no weights for block {self.block_paths[i]!r}: attach it with "
                               "lorakit.compose.gated(model, gate)")
        w = self._current[i]
        if w.shape[0] != x.shape[0]:
            raise RoutingError(f"block {self.block_paths[i]!r} had {w.shape[0]} tokens but {path} got {x.shape[0]}")
        return w


class FusionGate(nn.Module):
    """AutoLoRA's gated fusion over the adapters `names` (see the module docstring); `fuses = True` tells the adapted
    layers to hand it every adapter's output instead of asking for weights."""

    fuses = True

    def __init__(self, model: nn.Module, names: Sequence[str], timesteps: int = 0, cross: bool = True, seed: int = 0):
        super().__init__()
        self.names = _check_names(model, names)
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 0:
            raise ConfigError(f"timesteps must be an int ≥ 0 (0: no timestep bias), got {timesteps!r}")
        gen = torch.Generator().manual_seed(seed)
        self.index: dict[str, int] = {}
        self.weights = nn.ParameterList()
        for path, layer in _layers_holding(model, self.names):
            w = torch.randn(4 + timesteps, layer.kind.out_features, generator=gen)
            w[3] = 0.512  # rows: w_lora, w_cross, b, w_out, then one bias per timestep bucket
            w[4:] = 0.0
            self.index[path] = len(self.weights)
            self.weights.append(nn.Parameter(w))
        self.cross, self.timesteps, self.step = cross, timesteps, None

    def set_timestep(self, bucket: Optional[int]) -> None:
        """The timestep bucket (0 … timesteps − 1) whose bias the next forwards use; None: no timestep bias."""
        if bucket is not None and not (isinstance(bucket, int) and 0 <= bucket < self.timesteps):
            raise ConfigError(f"timestep bucket must be in [0, {self.timesteps}), got {bucket!r}")
        self.step = bucket

    def forward(self, path: str, h: torch.Tensor, deltas: list) -> torch.Tensor:
        if path not in self.index:
            raise RoutingError(f"FusionGate has no weights for layer {path!r}; build the gate on this model")
        w = self.weights[self.index[path]]
        w_lora, w_cross, bias, w_out = w[0], w[1], w[2], w[3]
        if self.step is not None:
            bias = bias + w[4 + self.step]
        norm = lambda t: nn.functional.layer_norm(t.float(), t.shape[-1:])  # noqa: E731
        h_norm, out = norm(h), h.float()
        for d in deltas:
            if d is None:
                continue
            d_norm = norm(d)
            logit = w_lora * d_norm + bias + (w_cross * h_norm * d_norm if self.cross else 0.0)
            out = out + w_out * torch.sigmoid(logit) * d.float()
        return out


class MoleGate(nn.Module):
    """MoLE's gate over the adapters `names` at layer granularity (see the module docstring); a fusing gate."""

    fuses = True

    def __init__(self, model: nn.Module, names: Sequence[str], record_balance: bool = False):
        super().__init__()
        self.names = _check_names(model, names)
        self.record_balance = bool(record_balance)  # keep each layer's gate mass (with its graph) for balance_loss
        self.index: dict[str, int] = {}
        self.e = nn.ParameterList()
        for path, layer in _layers_holding(model, self.names):
            self.index[path] = len(self.e)
            self.e.append(nn.Parameter(torch.zeros(layer.kind.out_features)))
        self.log_tau = nn.Parameter(torch.zeros(()))
        self._mass: list[torch.Tensor] = []

    def forward(self, path: str, h: torch.Tensor, deltas: list) -> torch.Tensor:
        if path not in self.index:
            raise RoutingError(f"MoleGate has no weights for layer {path!r}; build the gate on this model")
        e = self.e[self.index[path]]
        present = [d.float() for d in deltas if d is not None]
        scores = torch.stack([nn.functional.layer_norm(d, d.shape[-1:]) @ e for d in present], dim=-1)
        w = torch.softmax(scores / self.log_tau.exp(), dim=-1)
        if self.record_balance:
            self._mass.append(w.mean(0))
        return h.float() + sum(w[:, i:i + 1] * d for i, d in enumerate(present))

    def balance_loss(self) -> torch.Tensor:
        """−Σᵢ log q̄ᵢ, q̄ = the gate mass of each adapter averaged over the layers of the last forward (MoLE's
        balancing term; layers lacking some adapter are left out); resets the record."""
        n = len(self.names)
        mass = [m for m in self._mass if m.numel() == n]
        self._mass = []
        if not mass:
            raise RoutingError("no gate mass recorded: build the gate with record_balance=True and run a forward "
                               "before each balance_loss()")
        return -torch.log(torch.stack(mass).mean(0).clamp(min=1e-12)).sum()


@contextlib.contextmanager
def gated(model: nn.Module, gate: nn.Module):
    """Route `model` through `gate` (its `names`) inside this context, with the gate registered as
    `model.lorakit_gate` and its parameters the only trainable ones; all restored on exit."""
    if hasattr(model, GATE_ATTR):
        raise ConfigError(f"model already has a {GATE_ATTR!r}; nest gated() contexts is not supported")
    frozen = [p for p in model.parameters() if p.requires_grad]
    handles = gate.attach(model) if hasattr(gate, "attach") else []
    for p in frozen:
        p.requires_grad_(False)
    model.add_module(GATE_ATTR, gate)
    try:
        with route(model, weights=gate, adapters=gate.names):
            yield gate
    finally:
        delattr(model, GATE_ATTR)
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        if hasattr(gate, "_current"):
            gate._current.clear()
