"""Step schedules for composing several LoRAs in a diffusion sampling loop (training.md §13, compose.md §3).

`sample(unet, scheduler, latents, cond, uncond, steps, guidance, schedule)` is a classifier-free-guidance loop
over a diffusers UNet and scheduler; the schedule decides, per step, how the adapters enter the noise prediction:

- `Merge(names)`: all LoRAs active at once (their deltas summed), one pass per step (the baseline).
- `Switch(names, every=5)`: one LoRA at a time, cycled every τ steps (LoRA Switch, Zhong et al. 2024).
- `Composite(names, batched=False)`: one pass per LoRA and step, predictions averaged, then CFG (LoRA Composite);
  `batched=True` stacks the batch once per LoRA and routes each copy to its LoRA: one forward per step.
- `Dominant(high, low)`: CMLoRA (Zou et al. 2025), a weighted composite with a rotating dominant LoRA and
  per-LoRA caching of predictions on a non-uniform refresh schedule.
- `Scheduled(weights_fn)`: per-step weights over the LoRAs (DimensionX-style), one pass per step; `piecewise`
  gives the S-then-T director switch.
- `Gated(gate)`: a gate of `lorakit.compose.gates` (AutoLoRA's `FusionGate`, `MoleGate`, `ArrowGate`) routes every
  step, one pass per step; a FusionGate with timestep buckets gets each step's bucket. `fit_gate` trains one with
  AutoLoRA's objective on (latents, prompt) examples of each LoRA's concept.

A "pass" is one UNet forward on the CFG batch (unconditional and conditional rows together); every schedule
counts its passes in `passes` (reset when a run starts). Schedules check their arguments when built and the
adapter names when a run starts, before any step. `sample` leaves the model's active adapters as it found them.
Per-token mixing (`Scheduled` with blended weights) needs adapters on linear layers only (e.g. the attention
projections `ATTENTION`); the other schedules work with any targets.

The `tiny_*` and `add_random_loras` helpers build small seeded UNets / text encoders from config (no Hub access)
for tests and benchmarks; they need `diffusers` (the `dev` extra), the rest of this module does not.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, RoutingError
from ..kinds import ConvKind
from ..model import active_adapters, adapter_names, check_names, disabled, inject, set_active, wrappers
from ..routing import route

__all__ = ["ATTENTION", "Composite", "Dominant", "Gated", "Merge", "Schedule", "Scheduled", "Switch",
           "add_random_loras", "embed", "fit_gate", "gate_loss", "piecewise", "sample", "timestep_bucket",
           "tiny_text_encoder", "tiny_unet"]

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of a diffusers UNet (linear layers)


# ---- small seeded models (tests, benchmarks) ---------------------------------------------------
def tiny_unet(sample_size: int = 8, block_out_channels: tuple[int, ...] = (32, 64), cross_attention_dim: int = 32,
              seed: int = 0) -> nn.Module:
    """A `UNet2DConditionModel` with random weights: 4 latent channels, one cross-attention down and up block,
    one resnet per block, heads of 8 channels; in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=block_out_channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=min(32, block_out_channels[0]))
    return unet.eval()


def tiny_text_encoder(hidden: int = 32, layers: int = 2, vocab: int = 100, positions: int = 16,
                      seed: int = 0) -> nn.Module:
    """A `CLIPTextModel` with random weights (4 heads); `embed(encoder, ids)` gives the UNet's `cond`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, vocab_size=vocab, max_position_embeddings=positions,
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
    return CLIPTextModel(config).eval()


@torch.no_grad()
def embed(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token ids (batch, tokens) → the last hidden states, the UNet's `encoder_hidden_states`."""
    return text_encoder(ids).last_hidden_state


def add_random_loras(unet: nn.Module, names: Sequence[str], r: int = 4, targets: Sequence[str] = ATTENTION,
                     noise: float = 0.3, seed: int = 0) -> nn.Module:
    """Inject one LoRA per name on `targets`, B nonzero and every factor perturbed (distinct, non-trivial deltas)."""
    from ..config import AdapterConfig

    for name in names:
        inject(unet, AdapterConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False),
               name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, p in unet.named_parameters():
            if ".adapters." in path:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise)
    return unet


# ---- the sampling loop -------------------------------------------------------------------------
@torch.no_grad()
def sample(unet: nn.Module, scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
           steps: int, guidance: float = 7.5, schedule: Optional[Schedule] = None,
           callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """Denoise `latents` (batch, channels, h, w) in `steps` scheduler steps with classifier-free guidance:
    ε = ε_u + guidance·(ε_c − ε_u), the UNet run on [uncond; cond] rows. `schedule=None` runs the model with
    the adapters active now. `callback(step_index, timestep, latents)` sees the latents after each step."""
    schedule = _Active() if schedule is None else schedule
    _check_inputs(latents, cond, uncond, steps, schedule)
    scheduler.set_timesteps(steps, device=latents.device)
    schedule.start(unet, list(scheduler.timesteps))
    emb = torch.cat([uncond, cond])
    latents = latents * scheduler.init_noise_sigma
    active = active_adapters(unet)
    try:
        for i, t in enumerate(scheduler.timesteps):
            latents = schedule.update(unet, scheduler, latents, t, emb, i)
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_u, eps_c = schedule.predict(unet, x, t, emb, i).chunk(2)
            latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, t, latents)
    finally:
        if active_adapters(unet) != active:
            set_active(unet, active)
    return latents


def _check_inputs(latents, cond, uncond, steps, schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"schedule must be a Schedule (Merge, Switch, Composite, Dominant, Scheduled) or None, "
                          f"got {type(schedule).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if cond.shape != uncond.shape or cond.shape[0] != latents.shape[0]:
        raise ConfigError(f"cond and uncond must have the same shape, with one row per latent: got cond "
                          f"{tuple(cond.shape)}, uncond {tuple(uncond.shape)}, latents {tuple(latents.shape)}")


def _activate(unet: nn.Module, names: list[str]) -> None:
    if active_adapters(unet) != names:
        set_active(unet, names)


# ---- schedules ---------------------------------------------------------------------------------
class Schedule:
    """How the adapters enter each step's noise prediction. Subclasses implement `predict`."""

    def __init__(self, names: Optional[Sequence[str]] = None):
        self.names = [] if names is None else check_names(names, "the schedule")
        self.passes = 0

    def start(self, unet: nn.Module, timesteps: list) -> None:
        """Check the adapter names against `unet` and reset the pass count (before the first step)."""
        _check_known(unet, self.names)
        self.passes = 0

    def update(self, unet: nn.Module, scheduler, latents: torch.Tensor, t, emb: torch.Tensor, i: int) -> torch.Tensor:
        """The latents step `i` denoises, from those it was given (called before `predict`; checks that need the
        run's shapes go here at i = 0). Default: unchanged; schedules that move the latents override it (latent
        re-initialisation, test-time latent updates: `lorakit.compose.regional`)."""
        return latents

    def predict(self, unet: nn.Module, x: torch.Tensor, t, emb: torch.Tensor, i: int) -> torch.Tensor:
        """The noise prediction for the CFG batch `x` (unconditional rows first) at step `i`, timestep `t`."""
        raise NotImplementedError

    def _pass(self, unet: nn.Module, x: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    def _alone(self, unet: nn.Module, name: str, x: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        _activate(unet, [name])
        return self._pass(unet, x, t, emb)


class _Active(Schedule):
    """The adapters active now, one pass per step (what `sample(schedule=None)` runs)."""

    def predict(self, unet, x, t, emb, i):
        return self._pass(unet, x, t, emb)


class Merge(Schedule):
    """All `names` active together (deltas summed), one pass per step."""

    def predict(self, unet, x, t, emb, i):
        _activate(unet, self.names)
        return self._pass(unet, x, t, emb)


class Switch(Schedule):
    """One LoRA at a time: step i uses names[(i // every) % N] (LoRA Switch, τ = `every`, default 5).

    [code] The reference switches in a step-end callback when i > 0 and i % τ == 0, so its first LoRA runs τ + 1
    steps and the others τ; here every LoRA runs τ steps per turn."""

    def __init__(self, names: Sequence[str], every: int = 5):
        super().__init__(names)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"Switch(every=τ) needs an integer τ ≥ 1 (steps per LoRA turn), got {every!r}")
        self.every = every

    def active_at(self, i: int) -> str:
        return self.names[(i // self.every) % len(self.names)]

    def predict(self, unet, x, t, emb, i):
        return self._alone(unet, self.active_at(i), x, t, emb)


class Composite(Schedule):
    """Per step, one prediction per LoRA (each alone), averaged over the LoRAs (unconditional and conditional rows
    alike), then CFG (LoRA Composite). `batched=True` runs the N predictions as one forward on N stacked copies of
    the batch, copy k routed to names[k] (`lorakit.route`): same result, one pass per step."""

    def __init__(self, names: Sequence[str], batched: bool = False):
        super().__init__(names)
        self.batched = bool(batched)

    def predict(self, unet, x, t, emb, i):
        if not self.batched:
            return torch.stack([self._alone(unet, n, x, t, emb) for n in self.names]).mean(0)
        n = len(self.names)
        with route(unet, self.names):
            eps = self._pass(unet, torch.cat([x] * n), t, torch.cat([emb] * n))
        return eps.view(n, *x.shape).mean(0)


class Dominant(Schedule):
    """CMLoRA: a composite whose average weights one dominant LoRA c = N − ½ times more than each other one,
    w_nd = N / (c + N − 1), w_dom = c·w_nd (mean weight 1, so Σ wᵢεᵢ / N is a convex combination).

    LoRAs are ordered `high` then `low` (high- / low-frequency LoRAs: the user's partition [U]; the reference
    hard-codes it by category: character, clothing, style, object = high; background = low). Each LoRA's prediction
    is cached and recomputed only at refresh steps: every 2 steps over the first 37.5 % of the steps, every 3 until
    87.5 %, then every 2 (as the reference's lists, step 0 always included); `cache=False` refreshes every step.
    At each refresh step the dominant role moves to the next LoRA of the rotation window: the high-frequency LoRAs
    up to step `shift_at`·steps, then (when there are low-frequency LoRAs) the window shifted by one, names[1:H+1]
    for H high LoRAs, which takes in the first low-frequency LoRA. Between refreshes the dominant LoRA stays.

    [U] choices: the reference caches DeepCache-style deep UNet features and still runs the shallow layers of
    every LoRA each step; this caches whole predictions (no pass between refreshes). `refresh="all"` recomputes
    every LoRA at a refresh step; `refresh="dominant"` only the new dominant one (the reference's invalidation; the
    others keep older predictions). The shift step is the reference's fixed 120 of 220 steps scaled to the step
    count (default shift_at = 120/220). c stays N − ½: the reference decrements c in the loop but computes the
    weights once, before it; after the shift the reference's invalidation writes into a copy of its list (no
    effect), here the new dominant LoRA is refreshed throughout.
    """

    def __init__(self, high: Sequence[str], low: Sequence[str] = (), shift_at: float = 120 / 220, cache: bool = True,
                 refresh: str = "all"):
        high, low = check_names(high, "high"), list(low)
        super().__init__(high + low)
        self.high = high
        if refresh not in ("all", "dominant"):
            raise ConfigError(f"Dominant(refresh=) is 'all' or 'dominant', got {refresh!r}")
        if isinstance(shift_at, bool) or not isinstance(shift_at, (int, float)) or not 0 <= shift_at <= 1:
            raise ConfigError(f"Dominant(shift_at=) is a fraction of the steps in [0, 1], got {shift_at!r}")
        self.shift_at, self.cache, self.refresh = shift_at, bool(cache), refresh
        self.plan: list[tuple[str, list[str]]] = []
        self._cached: dict[str, torch.Tensor] = {}

    def weights(self) -> tuple[float, float]:
        """(w_dom, w_nd) for N LoRAs."""
        n = len(self.names)
        c = n - 0.5
        w_nd = n / (c + n - 1)
        return c * w_nd, w_nd

    def refresh_steps(self, steps: int) -> list[int]:
        if not self.cache:
            return list(range(steps))
        a, b = int(0.375 * steps), int(0.875 * steps)
        return sorted({0, *range(0, a, 2), *range(a, b, 3), *range(b, steps, 2)})

    def make_plan(self, steps: int) -> list[tuple[str, list[str]]]:
        """Per step: (dominant LoRA, LoRAs whose prediction is computed at that step)."""
        refresh, h = set(self.refresh_steps(steps)), len(self.high)
        shift = round(self.shift_at * steps)
        plan, dominant, turn = [], self.names[0], 0
        for i in range(steps):
            computed = []
            if i in refresh:
                window = self.names[:h] if i <= shift or len(self.names) == h else self.names[1:h + 1]
                dominant, turn = window[turn % h], turn + 1
                computed = self.names if self.refresh == "all" or i == 0 or not self.cache else [dominant]
            plan.append((dominant, list(computed)))
        return plan

    def planned_passes(self, steps: int) -> int:
        return sum(len(computed) for _, computed in self.make_plan(steps))

    def start(self, unet, timesteps):
        super().start(unet, timesteps)
        self.plan, self._cached = self.make_plan(len(timesteps)), {}

    def predict(self, unet, x, t, emb, i):
        dominant, computed = self.plan[i]
        for name in computed:
            self._cached[name] = self._alone(unet, name, x, t, emb)
        w_dom, w_nd = self.weights()
        return torch.stack([self._cached[n] * (w_dom if n == dominant else w_nd) for n in self.names]).mean(0)


class Scheduled(Schedule):
    """Per-step weights over the LoRAs (DimensionX's hybrid-dimension switch, compose.md §3): `weights_fn(step_index,
    timestep) -> {name: weight}`, output = base + Σ wᵢΔWᵢx in every adapted layer, one pass per step.

    The weights of all steps are read and checked when a run starts. Zero weights are dropped; a step with one LoRA
    at weight 1 runs it as the active adapter (exactly the single-LoRA model), one with none runs the base model,
    any other blend goes through `lorakit.route(unet, weights=...)`, which needs the LoRAs on linear layers."""

    def __init__(self, weights_fn: Callable[[int, object], Mapping[str, float]]):
        super().__init__()
        if not callable(weights_fn):
            raise ConfigError(f"Scheduled needs a function weights_fn(step_index, timestep), got "
                              f"{type(weights_fn).__name__}")
        self.weights_fn = weights_fn
        self.table: list[dict[str, float]] = []

    def start(self, unet, timesteps):
        steps = getattr(self.weights_fn, "steps", len(timesteps))
        if steps != len(timesteps):
            raise ConfigError(f"the weight schedule was built for {steps} steps, but the run has {len(timesteps)}")
        self.table = [self._read(unet, i, t) for i, t in enumerate(timesteps)]
        self.names = list(dict.fromkeys(n for w in self.table for n in w))
        blended = sorted({n for w in self.table if not _one_hot(w) for n in w})
        _check_linear(unet, blended)
        self.passes = 0

    def _read(self, unet, i, t) -> dict[str, float]:
        w = self.weights_fn(i, t)
        if not isinstance(w, Mapping):
            raise ConfigError(f"weights_fn must return {{name: weight}}, got {type(w).__name__} at step {i}")
        _check_known(unet, list(w))
        out = {}
        for name, value in w.items():
            try:
                value = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise ConfigError(f"weights_fn gives {name!r} the weight {value!r} at step {i}, not a number") from None
            if not math.isfinite(value):
                raise ConfigError(f"weights_fn gives {name!r} the non-finite weight {value} at step {i}")
            if value != 0:
                out[name] = value
        return out

    def predict(self, unet, x, t, emb, i):
        w = self.table[i]
        if not w:
            with disabled(unet):
                return self._pass(unet, x, t, emb)
        if _one_hot(w):
            return self._alone(unet, next(iter(w)), x, t, emb)
        weights = {n: torch.tensor([v], dtype=torch.float64) for n, v in w.items()}
        with route(unet, weights=weights):
            return self._pass(unet, x, t, emb)


def timestep_bucket(t, buckets: int, num_train_timesteps: int = 1000) -> int:
    """The bucket (0 … buckets − 1) of diffusion timestep t: ⌊t·buckets / T⌋ over T training timesteps."""
    return min(buckets - 1, max(0, int(t) * buckets // num_train_timesteps))


def _set_bucket(gate: nn.Module, t, num_train_timesteps: int) -> None:
    if getattr(gate, "timesteps", 0):
        gate.set_timestep(timestep_bucket(t, gate.timesteps, num_train_timesteps))


class Gated(Schedule):
    """A gate over `gate.names` (`FusionGate`, `MoleGate`, `ArrowGate`, any `route` gate) at every step, one pass
    per step; a gate with timestep buckets (`FusionGate(timesteps=K)`) gets the bucket of each step's timestep
    (`timestep_bucket`, over `num_train_timesteps`, the scheduler's T: 1000 in diffusers)."""

    def __init__(self, gate: nn.Module, num_train_timesteps: int = 1000):
        super().__init__(getattr(gate, "names", None))
        if not callable(gate) or not self.names:
            raise ConfigError("Gated needs a gate with `names` (lorakit.compose.gates: FusionGate, MoleGate, ...)")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.gate, self.num_train_timesteps = gate, num_train_timesteps

    def predict(self, unet, x, t, emb, i):
        _set_bucket(self.gate, t, self.num_train_timesteps)
        with route(unet, weights=self.gate, adapters=self.names):
            return self._pass(unet, x, t, emb)


def gate_loss(unet: nn.Module, gate: nn.Module, scheduler, latents: torch.Tensor, own: torch.Tensor,
              other: torch.Tensor, t: int, noise: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """AutoLoRA's gate objective on one batch (compose.md §4, ε-prediction in place of the flow target):
    MSE(ε̂(x_t, t | own prompt), ε) + max(0, margin − MSE(ε̂(x_t, t | another LoRA's prompt), ε)), with x_t the
    scheduler's noising of `latents` by `noise` at timestep t; the gate routes `unet` (bucket of t set)."""
    x_t = scheduler.add_noise(latents, noise, torch.full((latents.shape[0],), int(t), dtype=torch.long))
    _set_bucket(gate, t, scheduler.config.num_train_timesteps)
    with route(unet, weights=gate, adapters=gate.names):
        fit = F.mse_loss(unet(x_t, t, encoder_hidden_states=own, return_dict=False)[0], noise)
        wrong = F.mse_loss(unet(x_t, t, encoder_hidden_states=other, return_dict=False)[0], noise)
    return fit + F.relu(margin - wrong)


def fit_gate(unet: nn.Module, gate: nn.Module, scheduler, examples: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
             steps: int = 100, batch: int = 4, lr: float = 1e-3, margin: float = 0.5, drop_prompt: float = 0.3,
             uncond: Optional[torch.Tensor] = None, seed: int = 0, progress: bool = True) -> list[float]:
    """Train `gate` (its parameters only; the UNet and LoRAs stay frozen) with AutoLoRA's recipe (compose.md §4):
    each step draws two LoRAs i ≠ j of `examples` ({name: (latents (n, C, H, W), prompts (n, L, D))}, each LoRA's
    concept), `batch` examples of i, one timestep t uniform over the scheduler's T and noise ε, and minimises
    `gate_loss` with i's prompts (each replaced by `uncond` with probability `drop_prompt`) against j's prompts;
    AdamW at `lr`, cosine decay. Returns the loss of every step. The card's timestep-aware gate is [U] upstream:
    a FusionGate with `timesteps=K` learns one bias per bucket of t."""
    from tqdm.auto import tqdm

    from .gates import gated

    names = list(examples)
    if len(names) < 2 or set(names) - set(gate.names):
        raise ConfigError(f"fit_gate needs examples for at least two of the gate's adapters {gate.names}, got "
                          f"{names}")
    for name, (x0, c) in examples.items():
        if x0.dim() != 4 or c.dim() != 3 or x0.shape[0] != c.shape[0] or x0.shape[0] < 1:
            raise ConfigError(f"examples[{name!r}] must be (latents (n, C, H, W), prompts (n, L, D)) with the same "
                              f"n ≥ 1, got {tuple(x0.shape)} and {tuple(c.shape)}")
    if not 0 <= drop_prompt < 1 or (drop_prompt > 0 and uncond is None):
        raise ConfigError("drop_prompt must be in [0, 1), and needs `uncond` (the empty prompt's embedding) when > 0")
    for what, v in (("steps", steps), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{what} must be a positive integer, got {v!r}")
    gen = torch.Generator().manual_seed(seed)
    total_t = scheduler.config.num_train_timesteps
    losses = []
    with gated(unet, gate):
        params = [p for p in gate.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for _ in tqdm(range(steps), desc="gate", unit="step", leave=False, disable=not progress):
            i, j = torch.randperm(len(names), generator=gen)[:2].tolist()
            x0, own = examples[names[i]]
            rows = torch.randint(0, x0.shape[0], (batch,), generator=gen)
            x0, own = x0[rows], own[rows]
            other = examples[names[j]][1]
            other = other[torch.randint(0, other.shape[0], (batch,), generator=gen)]
            if drop_prompt > 0:
                dropped = (torch.rand(batch, generator=gen) < drop_prompt).to(own.device)
                own = torch.where(dropped[:, None, None], uncond.to(own).expand_as(own), own)
            t = int(torch.randint(0, total_t, (), generator=gen))
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            loss = gate_loss(unet, gate, scheduler, x0, own, other, t, noise, margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            decay.step()
            losses.append(loss.item())
    return losses


def piecewise(first: str, second: str, tau: float, steps: int) -> Callable[[int, object], dict[str, float]]:
    """Weights for `Scheduled`: `first` at weight 1 for the first round(τ·steps) steps, then `second` (DimensionX's
    S- then T-director; which goes first and τ are the user's choice, [U] in the public code)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"piecewise needs the run's step count, a positive integer, got {steps!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        raise ConfigError(f"piecewise τ is the fraction of the steps given to {first!r}, in [0, 1], got {tau!r}")
    check_names([first, second], "piecewise")
    switch = round(tau * steps)

    def weights(i: int, t=None) -> dict[str, float]:
        return {first: 1.0} if i < switch else {second: 1.0}

    weights.steps, weights.switch = steps, switch
    return weights


# ---- checks ------------------------------------------------------------------------------------
def _check_known(unet: nn.Module, names: Sequence[str]) -> None:
    known = set(adapter_names(unet))
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    if unknown:
        raise RoutingError(f"unknown adapter name(s) {unknown}; this model has {adapter_names(unet)}")


def _check_linear(unet: nn.Module, names: Sequence[str]) -> None:
    conv = [path for path, layer in wrappers(unet)
            if isinstance(getattr(layer, "kind", None), ConvKind) and set(names) & set(layer.adapters)]
    if conv:
        raise RoutingError(f"blended weights over {list(names)} need their LoRAs on linear layers only, but they "
                           f"adapt convolutions {conv[:3]}{' …' if len(conv) > 3 else ''}; target the attention "
                           f"projections {ATTENTION}")


def _one_hot(w: Mapping[str, float]) -> bool:
    return len(w) == 1 and next(iter(w.values())) == 1.0
