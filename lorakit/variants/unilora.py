"""Uni-LoRA (arXiv 2506.00799): every entry of every A and B is one entry of a single trainable vector θ_d, scaled
by 1/√(times that entry is used) — an isometric projection fixed by a seed. ΔW = B·A, no α; PEFT's "UNILORA" format."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedFeatureError
from . import _seeded, register_variant
from .base import LowRankVariant, Shared
from .vblora import from_peft_common, peft_common, refuse_patterns

GENERATOR = "numpy.PCG64"  # numpy.random.default_rng, as PEFT and the reference code
CHECKSUM_KEY = "lorakit_index_checksum"  # our key in adapter_config.json (PEFT ignores it, with a warning)


def assign_indices(total: int, length: int, seed: int) -> torch.Tensor:
    """Which θ_d entry each of `total` LoRA entries reads: every entry `total // length` times, `total % length`
    distinct entries once more (drawn without replacement), the whole list then shuffled; numpy `default_rng(seed)`
    (PEFT's `generate_index` stream, so PEFT-saved adapters map to the same entries)."""
    rng = np.random.default_rng(seed)
    times, extra = divmod(total, length)
    order = np.repeat(np.arange(length, dtype=np.int64), times)
    if extra:
        order = np.concatenate([order, rng.choice(length, size=extra, replace=False).astype(np.int64)])
    rng.shuffle(order)
    return torch.from_numpy(order)


def index_checksum(indices: torch.Tensor) -> str:
    """`<generator>:sha256:<hex>` of the flat index assignment (its length and int64 bytes)."""
    digest = hashlib.sha256(f"{indices.numel()};".encode())
    digest.update(indices.numpy().astype("<i8").tobytes())
    return f"{GENERATOR}:sha256:{digest.hexdigest()}"


class ThetaD(Shared):
    """The model-wide trainable vector θ_d (saved as `base_model.unilora_theta_d`) and, until the layers take them,
    each layer's indices and scales."""

    def __init__(self, length: int, bound: float, assignment: dict):
        super().__init__()
        self.bound = bound
        self.unilora_theta_d = nn.Parameter(torch.empty(length))
        self.assignment = assignment  # path → (indices_A, indices_B, scales_A, scales_B), popped by each layer

    def initialize(self, how) -> None:
        with torch.no_grad():
            if how is False:  # PEFT's init_weights=False
                self.unilora_theta_d.normal_()
            else:
                self.unilora_theta_d.uniform_(-self.bound, self.bound)

    def file_tensors(self):
        return {"unilora_theta_d": self.unilora_theta_d}


@register_variant
class UniLoRA(LowRankVariant):
    """Uni-LoRA: A = θ_d[idx_A] ⊙ s_A (r×n), B = θ_d[idx_B] ⊙ s_B (m×r); only θ_d (d = `theta_d_length`) trains.

    The D = Σ_layers r·(n + m) LoRA entries are laid out layer by layer in model order, each layer A row-major then
    B row-major, and assigned θ_d entries by `assign_indices(D, d, proj_seed)`; s = 1/√(uses of that entry), so
    the projection P (D×d) has PᵀP = I. This is PEFT's layout and stream: PEFT-saved adapters give equal outputs.
    As in PEFT, s is rounded to the base weight's dtype (on a bf16 base, 1/√10 is 0.3164).
    `d > D` is refused (ConfigError naming theta_d_length; PEFT allows it, leaving entries unused).

    Indices and scales are rebuilt from the seed on every inject and load. With `save_indices=True` they are also
    saved per layer (`unilora_indices_{A,B}`, `unilora_scales_{A,B}`, PEFT's keys) and a load uses the file's
    values. Without, inject records `index_checksum` = "<generator>:sha256:<hex>" of the assignment (in
    adapter_config.json as `lorakit_index_checksum`, a key PEFT ignores with a warning), and a load whose
    regenerated assignment differs raises StateDictError: numpy's stream changed, or the file was made for layers
    of other sizes (θ_d alone fits any model, so nothing else would notice). Same convention as VeRA/RandLoRA.

    No α (`lora_alpha` ignored, as in PEFT); `rank_pattern`, `alpha_pattern`, `use_rslora` and `exclude_modules`
    are refused with UnsupportedFeatureError (PEFT's format has none of them). Init: θ_d ~ U(−bound, bound) (tiny
    non-zero ΔW), N(0, 1) with `init_lora_weights=False` (PEFT's `init_weights=False`); "gaussian" is refused.
    Works on Linear, transformers Conv1D, Conv1d/Conv2d (A as the flattened kernel) and Embedding; PEFT reads only
    the Linear/Conv1D ones.
    """

    name = "unilora"
    peft_type = "UNILORA"
    pair_refusal = "its factors are projections of one shared vector"

    @dataclass
    class Options:
        theta_d_length: int = 256
        proj_seed: int = 42
        init_theta_d_bound: float = 0.02
        save_indices: bool = False
        index_checksum: Optional[str] = None

        def __post_init__(self):
            for key, low in (("theta_d_length", 1), ("proj_seed", 0)):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ConfigError(f"option {key} must be an int ≥ {low}, got {value!r}")
            b = self.init_theta_d_bound
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
                raise ConfigError(f"option init_theta_d_bound must be a finite number > 0, got {b!r}")
            if not isinstance(self.save_indices, bool):
                raise ConfigError(f"option save_indices must be true or false, got {self.save_indices!r}")
            c = self.index_checksum
            if c is not None and not (isinstance(c, str) and c.startswith(GENERATOR + ":sha256:")):
                raise ConfigError(f"option index_checksum must be null or '{GENERATOR}:sha256:<hex>' as lorakit "
                                  f"writes it, got {c!r}")

    @classmethod
    def build_shared(cls, config, sites):
        refuse_patterns(config, cls.name)
        if config.exclude_modules:
            raise UnsupportedFeatureError(f"exclude_modules is not supported by variant {cls.name!r} (PEFT's "
                                          f"UniLoraConfig has no such key); list the targets instead, got "
                                          f"{config.exclude_modules!r}")
        if config.init_lora_weights == "gaussian":
            raise ConfigError("init_lora_weights='gaussian' is not defined for variant 'unilora'; use true "
                              "(θ_d uniform) or false (θ_d normal)")
        opts = cls.parse_options(config.options)
        d = opts.theta_d_length
        sizes = [(s.path, s.r * s.kind.in_features, s.kind.out_features * s.r) for s in sites]
        total = sum(a + b for _, a, b in sizes)
        if d > total:
            raise ConfigError(f"option theta_d_length={d} is larger than the number of LoRA entries it feeds "
                              f"(D = Σ r·(in + out) = {total} over {len(sites)} layers); use theta_d_length ≤ {total}")
        flat = assign_indices(total, d, opts.proj_seed)
        _seeded.record_or_verify(config, index_checksum(flat), "unilora indices", seed_key="proj_seed",
                                 checksum_key="index_checksum", save_key="save_indices", library=np)
        inv_sqrt = torch.bincount(flat, minlength=d).float().rsqrt()  # every entry is used ≥ 1 time since d ≤ D
        assignment, at = {}, 0
        for site, (path, na, nb) in zip(sites, sizes):
            ia = flat[at:at + na].view(site.r, -1)
            ib = flat[at + na:at + na + nb].view(-1, site.r)
            rounded = inv_sqrt.to(site.kind.weight().dtype).float()  # PEFT keeps scales in the base dtype
            assignment[path] = (ia, ib, rounded[ia], rounded[ib])
            at += na + nb
        return ThetaD(d, opts.init_theta_d_bound, assignment)

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        ia, ib, sa, sb = self.shared.assignment.pop(self.path)
        self.register_buffer("unilora_indices_A", ia.clone())
        self.register_buffer("unilora_indices_B", ib.clone())
        self.register_buffer("unilora_scales_A", sa)
        self.register_buffer("unilora_scales_B", sb)

    def initialize(self, how):
        """Nothing per layer: θ_d is the adapter's only trainable tensor, initialized by `ThetaD`."""

    def file_tensors(self):
        if not self.opts.save_indices:
            return {}
        return {k: getattr(self, k) for k in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A",
                                              "unilora_scales_B")}

    def factors(self):
        theta = self.shared.unilora_theta_d
        a = theta[self.unilora_indices_A] * self.unilora_scales_A
        b = theta[self.unilora_indices_B] * self.unilora_scales_B
        return a, b, 1.0

    def extra_repr(self):
        return f"r={self.r}, theta_d_length={self.opts.theta_d_length}"

    # ---- PEFT's UniLoraConfig -----------------------------------------------------------------------
    @classmethod
    def peft_config(cls, config):
        opts = dict(config.options)
        checksum = opts.pop("index_checksum")
        out = peft_common(config, "unilora_dropout")
        out.update(opts, init_weights=config.init_lora_weights is not False, peft_type=cls.peft_type)
        if not opts["save_indices"] and checksum is not None:
            out[CHECKSUM_KEY] = checksum
        return out

    @classmethod
    def config_from_peft(cls, data):
        data = dict(data)
        keys = [f.name for f in dataclasses.fields(cls.Options) if f.name != "index_checksum"]
        out = from_peft_common(data, cls.name, "unilora_dropout", keys)
        if "init_weights" in out:
            out["init_lora_weights"] = out.pop("init_weights")
        if CHECKSUM_KEY in out:
            out["options"]["index_checksum"] = out.pop(CHECKSUM_KEY)
        return out
