"""HypeLoRA (Trojan & Gębala, arXiv 2603.19278): one hypernetwork generates every layer's LoRA factors."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from . import register_variant
from ..kinds import rank_fan_in_uniform_
from .base import LowRankVariant, Shared


# The reference's generator settings (btrojan-official/HypeLoRA `params/hypernet_transformer/*/*.py` L15-30 with
# torch's TransformerEncoderLayer defaults: FFN 2048, dropout 0.1, ReLU, post-norm; `params/hypernet_mlp/*/*.py`
# L17-35: three hidden layers of 2048, GELU, no dropout). An option left at None takes its generator's value here.
GENERATOR_DEFAULTS = {
    "transformer": dict(hidden=256, depth=2, embedding_dim=64, heads=16, ffn=2048, dropout=0.1, activation="relu"),
    "mlp": dict(hidden=2048, depth=4, embedding_dim=128, heads=1, ffn=0, dropout=0.0, activation="gelu"),
}


class _TransformerGenerator(nn.Module):
    """Embedding → hidden, a Transformer encoder over all layer tokens at once (no positions), hidden → factors."""

    def __init__(self, opts, out):
        super().__init__()
        self.inp = nn.Linear(opts.embedding_dim, opts.hidden)
        layer = nn.TransformerEncoderLayer(opts.hidden, opts.heads, dim_feedforward=opts.ffn, dropout=opts.dropout,
                                           activation=opts.activation, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, opts.depth, enable_nested_tensor=False)
        self.out = nn.Linear(opts.hidden, out)

    def forward(self, e):
        return self.out(self.encoder(self.inp(e)[None])[0])


class HyperNet(Shared):
    """The adapter's generator + one learned embedding per adapted layer; generates every layer's A and B in one
    call and keeps them until the next model forward (see `generated`). Also holds the blending factor a."""

    def __init__(self, opts, sites):
        super().__init__()
        self.opts = opts
        self.index = {s.path: i for i, s in enumerate(sites)}
        self.shapes = [(s.r, s.kind.in_features, s.kind.out_features) for s in sites]
        self.r_max = max(r for r, _, _ in self.shapes)
        self.n_max = max(n for _, n, _ in self.shapes)
        self.m_max = max(m for _, _, m in self.shapes)
        out = self.r_max * (self.m_max + (self.n_max if opts.a_mode == "generated" else 0))
        self.embeddings = nn.Parameter(torch.empty(len(sites), opts.embedding_dim))
        if opts.generator == "mlp":
            dims = [opts.embedding_dim] + [opts.hidden] * (opts.depth - 1) + [out]
            act = {"gelu": nn.GELU, "relu": nn.ReLU}[opts.activation]
            layers = []
            for i in range(len(dims) - 1):
                layers += [nn.Linear(dims[i], dims[i + 1]), act()] + ([nn.Dropout(opts.dropout)] if opts.dropout else [])
            self.generator = nn.Sequential(*layers[:-(2 if opts.dropout else 1)])
        else:
            self.generator = _TransformerGenerator(opts, out)
        self.register_buffer("blend", torch.tensor(float(opts.blend_start if opts.blend == "add" else 0.0)))
        self._cache = None  # (key, [(A_hyp or None, B_hyp, A_random or None) per layer])
        self._used: set[int] = set()

    def __getstate__(self):  # copies (deepcopy, pickle) start without generated tensors (they may hold a graph)
        return {**super().__getstate__(), "_cache": None, "_used": set()}

    def initialize(self, how):
        with torch.no_grad():
            nn.init.normal_(self.embeddings)
            for m in self.generator.modules():
                if m is not self.generator and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            self.blend.fill_(self.opts.blend_start if self.opts.blend == "add" else 0.0)
        self._cache = None

    def file_tensors(self):
        out = {"hypelora_embeddings": self.embeddings, "hypelora_blend": self.blend}
        out.update({f"hypelora_generator.{k}": p for k, p in self.generator.named_parameters()})
        return out

    # ---- blending schedule -------------------------------------------------------------------------
    @torch.no_grad()
    def set_step(self, step: int, total_steps: int) -> float:
        """a = a₀·(1 − step/total_steps), linear from `blend_start` to 0 (blend "add"); returns a. Call it
        after each optimizer step in a plain training loop (the Trainer does it through the step hook)."""
        if self.opts.blend == "add":
            self.blend.fill_(self.opts.blend_start * max(0.0, 1.0 - step / max(1, total_steps)))
        return float(self.blend)

    def before_optimizer_step(self, trainer) -> None:
        """Trainer hook: the blend for the next step's forward (trainer.step counts finished steps)."""
        self.set_step(trainer.step + 1, trainer.total_steps)

    # ---- generation ----------------------------------------------------------------------------------
    def _key(self) -> tuple:
        tensors = (*self.parameters(), self.blend)
        return (torch.is_grad_enabled(), self.training,
                tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))

    def precompute(self) -> None:
        """Generate every layer's factors now, in one generator call (done automatically once per forward)."""
        self._generate(self._key())

    def _generate(self, key) -> None:
        raw = self.generator(self.embeddings)  # (layers, r·m [+ r·n]): one call for the whole model
        if raw.requires_grad:  # a backward through this generation ends it: the next forward regenerates
            raw.register_hook(self._drop_after_backward)
        r, m, n = self.r_max, self.m_max, self.n_max
        sample = self.opts.a_mode == "random" and self.training and torch.is_grad_enabled()
        layers = []
        for i, (r_l, n_l, m_l) in enumerate(self.shapes):
            b = raw[i, :r * m].view(m, r)[:m_l, :r_l]
            a = raw[i, r * m:].view(r, n)[:r_l, :n_l] if self.opts.a_mode == "generated" else None
            rand = None
            if sample:
                rand = rank_fan_in_uniform_(torch.empty(r_l, n_l, device=raw.device, dtype=raw.dtype))
            layers.append((a, b, rand))
        self._cache, self._used = (key, layers), set()

    def _drop_after_backward(self, grad):
        self._cache = None

    def generated(self, path: str) -> tuple:
        """(A_hyp or None, B_hyp, random A or None) for layer `path`.

        One generator call serves a whole model forward: the cache is reused until a parameter or the blend
        changes (version counters), the grad/training mode changes, a backward ran through it, or — with
        autograd on — a layer asks again (that is the next forward; each forward gets its own graph, so several
        forwards per step, each with its own backward, work)."""
        i = self.index[path]
        key = self._key()
        if self._cache is None or self._cache[0] != key or (key[0] and i in self._used):
            self._generate(key)
        if key[0]:
            self._used.add(i)
        return self._cache[1][i]


@register_variant
class HypeLoRA(LowRankVariant):
    """HypeLoRA: a hypernetwork (MLP, or a Transformer encoder over all layer tokens) maps a learned embedding
    per adapted layer to that layer's LoRA factors: ΔW_l = s·B_l·A_l, s = α/r, model-wide trainable state only
    (generator + embeddings, `model.lorakit_shared[name]`); the backbone and per-layer tensors are frozen.

    A modes (`a_mode`): "fixed" (default, as the reference code: a frozen random A per layer, only B generated),
    "random" (training forwards draw a fresh A per forward; evaluation, merging and export use the layer's frozen A
    — our choice: the reference redraws it in evaluation too), "generated" (A and B both generated). The fixed and
    random A are U(±1/√r), as the reference's kaiming_uniform_(a=√5) on A stored as (in, r) (`models/hypernet.py`
    L66-71, L97-98); PEFT's (r, in) layout would give U(±1/√in).

    Blending "add" (default; the reference's transformer runs set `noise_type_A = noise_type_B = "add"`,
    `models/dynamic_lora_layer.py` L51-63): A = (1 − a)·A_mode + a·A_init and B = (1 − a)·B_hyp + a·B_init, in
    every A mode, fixed included. A_init, B_init are PEFT's LoRA init (A_init U(±1/√in), frozen buffer
    `hypelora_A_init`; B_init = 0). a decays linearly from `blend_start` (0.99) to 0 over training: the Trainer
    calls the shared module's `before_optimizer_step`, plain loops call `model.lorakit_shared[name].set_step(step,
    total_steps)` (the reference's callback counts micro-batches against optimizer steps, so with gradient
    accumulation 2 its a stops near 0.5; we take its README's intent, 0). `blend="none"`: a = 0. At init ΔW is
    tiny but non-zero: 0.01·s·B_hyp·(0.01·A + 0.99·A_init). The reference's "replace"/"multiply" blends and the
    generator input concatenated with flattened A are not implemented.

    Generator (defaults: the reference's runs, `GENERATOR_DEFAULTS`): "transformer" (default; input projection
    64 → 256, 2 post-norm encoder layers, 16 heads, FFN 2048, ReLU, dropout 0.1, no positions, then an output
    projection) or "mlp" (4 Linear layers of width 2048, GELU, no dropout, embeddings 128). The output has
    r_max·m_max (+ r_max·n_max) entries per layer; layers with smaller shapes or ranks take the top-left block.
    `precompute`: all layers' factors come from one generator call per model forward (`HyperNet.generated`).
    `factors()` returns the generated (A, B, s), so merging and `lorakit.export_lora` (a plain PEFT LoRA with the
    static generated factors) work. Files: our own format (LORAKIT_HYPELORA): `hypelora_A` and `hypelora_A_init`
    (frozen) per layer; `base_model.hypelora_embeddings`, `base_model.hypelora_blend` (a) and
    `base_model.hypelora_generator.*`.
    """

    name = "hypelora"
    peft_type = "LORAKIT_HYPELORA"
    pair_refusal = "its factors are generated by a shared hypernetwork"

    @dataclass
    class Options:
        a_mode: str = "fixed"  # "fixed" | "random" | "generated"
        generator: str = "transformer"  # "transformer" | "mlp"
        hidden: Optional[int] = None  # None: the generator's reference value (GENERATOR_DEFAULTS), as below
        depth: Optional[int] = None  # MLP: Linear layers (≥ 2); transformer: encoder layers (≥ 1)
        embedding_dim: Optional[int] = None
        heads: Optional[int] = None  # transformer only; must divide hidden
        ffn: Optional[int] = None  # transformer only: feed-forward width
        dropout: Optional[float] = None  # inside the generator
        activation: Optional[str] = None  # "relu" | "gelu"
        blend: str = "add"  # "add" (decaying a) | "none"
        blend_start: float = 0.99  # a₀

        def __post_init__(self):
            choices = {"a_mode": ("fixed", "random", "generated"), "generator": ("mlp", "transformer"),
                       "blend": ("add", "none")}
            for key, allowed in choices.items():
                if getattr(self, key) not in allowed:
                    raise ConfigError(f"option {key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
            for key, value in GENERATOR_DEFAULTS[self.generator].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
            if self.activation not in ("relu", "gelu"):
                raise ConfigError(f"option activation must be 'relu' or 'gelu', got {self.activation!r}")
            if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                    or not 0 <= self.dropout < 1:
                raise ConfigError(f"option dropout must be in [0, 1), got {self.dropout!r}")
            for key in ("hidden", "depth", "embedding_dim", "heads") + (("ffn",) if self.generator == "transformer"
                                                                         else ()):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"option {key} must be an integer ≥ 1, got {value!r}")
            if self.generator == "mlp" and self.depth < 2:
                raise ConfigError(f"option depth must be ≥ 2 for the mlp generator, got {self.depth}")
            if self.generator == "transformer" and self.hidden % self.heads:
                raise ConfigError(f"option heads={self.heads} must divide hidden={self.hidden}")
            if isinstance(self.blend_start, bool) or not isinstance(self.blend_start, (int, float)) \
                    or not 0 <= self.blend_start <= 1:
                raise ConfigError(f"option blend_start must be in [0, 1], got {self.blend_start!r}")

    @classmethod
    def build_shared(cls, config, sites):
        return HyperNet(cls.parse_options(config.options), sites)

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.register_buffer("hypelora_A", torch.empty(r, kind.in_features))
        self.register_buffer("hypelora_A_init", torch.empty(r, kind.in_features))

    def initialize(self, how):
        with torch.no_grad():
            if how == "gaussian":
                nn.init.normal_(self.hypelora_A, std=1 / self.r)
                nn.init.normal_(self.hypelora_A_init, std=1 / self.r)
            else:
                rank_fan_in_uniform_(self.hypelora_A)  # the reference's kaiming on A stored as (in, r): U(±1/√r)
                nn.init.kaiming_uniform_(self.hypelora_A_init, a=math.sqrt(5))  # PEFT's lora_A init: U(±1/√in)

    def file_tensors(self):
        return {"hypelora_A": self.hypelora_A, "hypelora_A_init": self.hypelora_A_init}

    @property
    def lora_dtype(self):
        return self.hypelora_A.dtype

    def factors(self):
        a_hyp, b_hyp, a_rand = self.shared.generated(self.path)
        blend = self.shared.blend
        b = b_hyp * (1 - blend)  # + a·B_init, B_init = 0
        a = a_hyp if a_hyp is not None else self.hypelora_A if a_rand is None else a_rand
        return a * (1 - blend) + self.hypelora_A_init * blend, b, self.scale
