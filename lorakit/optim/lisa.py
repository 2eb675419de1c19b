"""LISA (Pan et al. 2024): layerwise importance-sampled AdamW, full-parameter training of a transformer.

Every K steps (`interval_steps`), all transformer blocks are frozen and γ (`activated_layers`) blocks, sampled
uniformly without replacement, are made trainable; everything outside the blocks (embeddings, LM head, final norm,
pooler, classifier) is always trainable. AdamW runs on what is trainable.

Blocks: the elements of the model's homogeneous `nn.ModuleList`s (decoder layers, encoder layers; both stacks of an
encoder-decoder), found automatically; `layers` (a list of dotted module paths such as ["model.layers"]) names
them explicitly.

Parameters and trainability: the factory hands every floating-point parameter of the model to the optimizer (so the
trainer's checkpoint saves the whole model) and sets `requires_grad` itself: True outside the blocks and on the
active blocks, False on the others (no gradients, no backward work above what is needed, no optimizer state).
It refuses a model with lorakit adapters injected.

When does the set switch: at the end of `step()`, after the update that completes a period of K steps, so the next
forward/backward already runs with the new set (the trainer's `before_optimizer_step` comes after backward, too late
to change which gradients exist). Works the same in the Trainer and a plain torch loop. The active set of period p is
a pure function of (seed, p) (`seed` option, default the run's seed), so it is reproducible and a resumed run
continues with the same sets. `before_optimizer_step(trainer)` only checks that the optimizer's step count agrees
with the trainer's and re-syncs the active set when it does not (e.g. a step count restored from elsewhere).

Optimizer state when blocks switch: a block that becomes inactive has its AdamW state (moments and step count)
dropped, so a block that becomes active again starts from fresh moments and fresh bias correction. This is what
LMFlow's LISATrainer does by rebuilding the optimizer at each switch, keeping only the always-on parameters' state.
Blocks that stay active across a switch keep their state. The always-on parameters keep theirs throughout.

Bookkeeping lives in param group 0 (`lisa_step`, `lisa_period`, `lisa_active`) so `state_dict()` saves it and
`load_state_dict` re-applies the saved active set.

Options (`optim_args`): `activated_layers` γ (default 2), `interval_steps` K (default 20), `seed` (default
args.seed), `layers` (None: automatic), `lr`, `betas`, `eps`, `weight_decay`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import AdaptedLayer
from . import register_optimizer

_OPTIONS = {"activated_layers", "interval_steps", "seed", "layers", "lr", "betas", "eps", "weight_decay"}


def find_blocks(model, paths=None) -> list[tuple[str, nn.Module]]:
    """(name, block) for the transformer blocks: the given ModuleList paths, else every homogeneous ModuleList of
    modules with parameters that is not nested inside another such list."""
    if paths is not None:
        found = []
        for path in paths:
            try:
                lst = model.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"lisa option layers: {path!r} is not a module of this model") from None
            if not isinstance(lst, (nn.ModuleList, nn.Sequential)):
                raise ConfigError(f"lisa option layers: {path!r} is a {type(lst).__name__}, not a ModuleList")
            found += [(f"{path}.{i}", m) for i, m in enumerate(lst)]
        return found
    found, roots = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(r + ".") for r in roots):
            continue
        kinds = {type(m) for m in module}
        if len(kinds) == 1 and all(any(True for _ in m.parameters()) for m in module):
            roots.append(name)
            found += [(f"{name}.{i}", m) for i, m in enumerate(module)]
    return found


class LISA(torch.optim.AdamW):
    """AdamW over group 0 (always on) and one group per block; `step()` resamples the active blocks every K steps."""

    def __init__(self, always_on, blocks, activated_layers=2, interval_steps=20, seed=0, **adamw):
        blocks = [list(b) for b in blocks]
        if not blocks:
            raise ConfigError("lisa found no transformer blocks (pass option layers, e.g. ['model.layers'])")
        if not (isinstance(activated_layers, int) and 1 <= activated_layers <= len(blocks)):
            raise ConfigError(f"lisa option activated_layers must be an integer in [1, {len(blocks)}] (the number "
                              f"of blocks), got {activated_layers!r}")
        if not (isinstance(interval_steps, int) and interval_steps >= 1):
            raise ConfigError(f"lisa option interval_steps must be an integer ≥ 1, got {interval_steps!r}")
        if not isinstance(seed, int):
            raise ConfigError(f"lisa option seed must be an integer, got {seed!r}")
        groups = [{"params": list(always_on), "lisa_step": 0, "lisa_period": 0, "lisa_active": [],
                   "lisa_gamma": activated_layers, "lisa_interval": interval_steps, "lisa_seed": seed}]
        groups += [{"params": b, "lisa_block": i} for i, b in enumerate(blocks)]
        super().__init__(groups, **adamw)
        for p in self.param_groups[0]["params"]:
            p.requires_grad_(True)
        self._activate(0)

    @property
    def num_blocks(self) -> int:
        return len(self.param_groups) - 1

    @property
    def active(self) -> list[int]:
        return list(self.param_groups[0]["lisa_active"])

    def sample(self, period: int) -> list[int]:
        """The γ blocks of period `period` (sorted), a function of (seed, period) only."""
        g0 = self.param_groups[0]
        gen = torch.Generator().manual_seed(g0["lisa_seed"] * 1_000_003 + period)
        return sorted(torch.randperm(self.num_blocks, generator=gen)[:g0["lisa_gamma"]].tolist())

    def _activate(self, period: int, chosen=None) -> None:
        g0 = self.param_groups[0]
        chosen = self.sample(period) if chosen is None else list(chosen)
        for group in self.param_groups[1:]:
            on = group["lisa_block"] in chosen
            for p in group["params"]:
                if not on:
                    self.state.pop(p, None)  # fresh moments if this block is sampled again
                    p.grad = None
                p.requires_grad_(on)
        g0["lisa_period"], g0["lisa_active"] = period, chosen

    def step(self, closure=None):
        loss = super().step(closure)
        g0 = self.param_groups[0]
        g0["lisa_step"] += 1
        if g0["lisa_step"] % g0["lisa_interval"] == 0:
            self._activate(g0["lisa_step"] // g0["lisa_interval"])
        return loss

    def before_optimizer_step(self, trainer) -> None:
        g0 = self.param_groups[0]
        if trainer.step != g0["lisa_step"]:
            g0["lisa_step"] = trainer.step
            period = trainer.step // g0["lisa_interval"]
            if period != g0["lisa_period"]:
                self._activate(period)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        g0 = self.param_groups[0]
        self._activate(g0["lisa_period"], g0["lisa_active"])


@register_optimizer("lisa")
def lisa(model, args, **options):
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"unknown lisa option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ConfigError("lisa trains the base model's weights (full-parameter); this model has lorakit adapters")
    paths = options.get("layers")
    if paths is not None and not (isinstance(paths, (list, tuple)) and all(isinstance(s, str) for s in paths)):
        raise ConfigError(f"lisa option layers must be a list of module paths, got {paths!r}")
    blocks = find_blocks(model, paths)
    in_block, block_params = set(), []
    for _, block in blocks:
        ps = [p for p in block.parameters() if p.is_floating_point() and id(p) not in in_block]
        in_block.update(id(p) for p in ps)
        block_params.append(ps)
    always = [p for p in model.parameters() if p.is_floating_point() and id(p) not in in_block]
    return LISA(always, block_params, activated_layers=options.get("activated_layers", 2),
                interval_steps=options.get("interval_steps", 20), seed=options.get("seed", args.seed),
                lr=options.get("lr", args.learning_rate),
                betas=tuple(options.get("betas", (args.adam_beta1, args.adam_beta2))),
                eps=options.get("eps", args.adam_epsilon),
                weight_decay=options.get("weight_decay", args.weight_decay))
