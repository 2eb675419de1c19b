"""Workloads and adapters for `bench/serve.py`: an S-LoRA-style request generator and fast PEFT adapter writer.

Requests (S-LoRA's `benchmarks/trace.py` scheme, re-implemented): the adapter of each request is
`floor(power(alpha) * N)` (alpha = 1 is uniform, smaller alpha favours low indices), gaps between arrivals are
Gamma-distributed with coefficient of variation `cv` at `rate` requests/s (open loop; cv = 1 is Poisson), or all
requests arrive at t = 0 (closed loop). Prompt and output lengths are uniform over inclusive ranges, prompt token
ids uniform over the vocabulary minus the special ids. Each property is drawn from its own seeded stream, so two
workloads with the same seed and request count share arrivals, lengths and prompts and differ only in which
adapter each request uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass(frozen=True)
class Workload:
    """One benchmark workload. `ranks` are cycled over the adapters (adapter i has rank ranks[i % len(ranks)])."""

    name: str
    n_adapters: int
    ranks: tuple[int, ...] = (8,)
    targets: tuple[str, ...] = QKVO
    alpha: float = 1.0
    mode: str = "closed"                     # "closed" (all at t=0) or "open" (Gamma arrivals)
    num_requests: int = 64
    rate: float = 1.0                        # requests/s (open loop)
    cv: float = 1.0                          # coefficient of variation of the gaps (open loop)
    input_range: tuple[int, int] = (8, 128)  # inclusive
    output_range: tuple[int, int] = (8, 64)  # inclusive
    vocab_size: int = 4096
    min_token_id: int = 4                    # prompt ids are drawn from [min_token_id, vocab_size): no special ids
    seed: int = 0

    def __post_init__(self):
        if self.n_adapters < 0:
            raise ValueError(f"n_adapters must be >= 0, got {self.n_adapters}")
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be 'closed' or 'open', got {self.mode!r}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive, got {self.ranks}")
        if self.alpha <= 0 or self.rate <= 0 or self.cv <= 0:
            raise ValueError("alpha, rate and cv must be > 0")
        if not 0 <= self.min_token_id < self.vocab_size:
            raise ValueError(f"min_token_id must be in [0, vocab_size), got {self.min_token_id}")
        for lo, hi in (self.input_range, self.output_range):
            if not 1 <= lo <= hi:
                raise ValueError(f"bad length range {(lo, hi)}")

    def rank_of(self, i: int) -> int:
        return self.ranks[i % len(self.ranks)]


@dataclass
class RequestSpec:
    """One generated request: `adapter` is an adapter index, or None for the base model."""

    index: int
    arrival: float
    adapter: int | None
    prompt_ids: list[int] = field(repr=False)
    output_len: int = 1


def generate_requests(w: Workload) -> list[RequestSpec]:
    """The workload's requests in arrival order (seeded; see the module docstring)."""
    n = w.num_requests
    adapters_ss, gaps_ss, in_ss, out_ss, ids_ss = np.random.SeedSequence(w.seed).spawn(5)
    if w.n_adapters:
        u = np.random.default_rng(adapters_ss).power(w.alpha, n)
        adapters = np.minimum(np.floor(u * w.n_adapters).astype(int), w.n_adapters - 1).tolist()
    else:
        adapters = [None] * n
    if w.mode == "open":
        shape, scale = 1.0 / (w.cv * w.cv), w.cv * w.cv / w.rate  # mean shape*scale = 1/rate, std/mean = cv
        arrivals = np.cumsum(np.random.default_rng(gaps_ss).gamma(shape, scale, n)).tolist()
    else:
        arrivals = [0.0] * n
    in_lens = np.random.default_rng(in_ss).integers(w.input_range[0], w.input_range[1] + 1, n)
    out_lens = np.random.default_rng(out_ss).integers(w.output_range[0], w.output_range[1] + 1, n)
    flat = np.random.default_rng(ids_ss).integers(w.min_token_id, w.vocab_size, int(in_lens.sum()))
    prompts = [p.tolist() for p in np.split(flat, np.cumsum(in_lens)[:-1])]
    return [RequestSpec(i, float(arrivals[i]), adapters[i], prompts[i], int(out_lens[i])) for i in range(n)]


def gap_stats(reqs: list[RequestSpec]) -> tuple[float, float]:
    """(mean, coefficient of variation) of the inter-arrival gaps, the first gap counted from t = 0."""
    gaps = np.diff([0.0] + [r.arrival for r in reqs])
    return float(gaps.mean()), float(gaps.std() / gaps.mean())


# ---- model dims and the theoretical LoRA FLOP overhead (serving.md §4.1) ----------------------------------------
@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> "Dims":
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        return cls(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), heads,
                   get("num_key_value_heads") or heads, get("vocab_size"))

    def shape(self, target: str) -> tuple[int, int]:
        """(d_in, d_out) of one projection."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}[target]

    def base_linear_macs(self) -> int:
        """Multiply-adds per token of every Linear of the model (7 projections per layer + LM head)."""
        per_layer = sum(a * b for a, b in map(self.shape, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj")))
        return self.layers * per_layer + self.hidden * self.vocab


def lora_macs(dims: Dims, r: float, targets=QKVO) -> float:
    """Extra multiply-adds per token of a rank-r adapter on `targets` of every layer: r (d_in + d_out) each."""
    return dims.layers * sum(r * sum(dims.shape(t)) for t in targets)


def flop_overhead(dims: Dims, r: float, targets=QKVO) -> dict[str, float]:
    """LoRA / base FLOPs: over the adapted projections only, and over every Linear of the model."""
    adapted = dims.layers * sum(math.prod(dims.shape(t)) for t in targets)
    extra = lora_macs(dims, r, targets)
    return {"adapted_layers": extra / adapted, "model": extra / dims.base_linear_macs()}


def mean_request_rank(w: Workload, reqs: list[RequestSpec]) -> float:
    ranks = [w.rank_of(r.adapter) for r in reqs if r.adapter is not None]
    return float(np.mean(ranks)) if ranks else 0.0


# ---- adapters -------------------------------------------------------------------------------------------------------
def adapter_key(layer: int, target: str, which: str) -> str:
    block = "self_attn" if target in _ATTN else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{target}.lora_{which}.weight"


def adapter_config(r: int, targets, base_model: str, lora_alpha: int | None = None) -> dict:
    """A PEFT `adapter_config.json` dict (from PEFT's own LoraConfig when peft is importable)."""
    alpha = lora_alpha if lora_alpha is not None else 2 * r
    try:
        from peft import LoraConfig

        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                         task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True).to_dict()
        return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))
    except ImportError:  # the fields any PEFT-format reader needs
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                "use_rslora": False, "base_model_name_or_path": base_model, "inference_mode": True}


def write_adapter(path: Path, dims: Dims, r: int, targets=QKVO, seed: int = 0, base_model: str = "") -> int:
    """Write one PEFT LoRA dir with random A and non-zero random B (tensors written directly with safetensors,
    no PEFT model built). Returns the bytes of tensor data."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims.layers):
        for t in targets:
            d_in, d_out = dims.shape(t)
            tensors[adapter_key(layer, t, "A")] = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
            tensors[adapter_key(layer, t, "B")] = torch.randn(d_out, r, generator=g) * (0.5 / math.sqrt(r))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config(r, targets, base_model), indent=1))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def adapter_bytes(dims: Dims, r: int, targets=QKVO) -> int:
    return 4 * lora_macs(dims, r, targets)  # fp32: one parameter per multiply-add


def ensure_adapters(root: Path, w: Workload, dims: Dims, base_model: str = "", log=print) -> list[Path]:
    """The workload's N adapter dirs under `root`, written once and reused (a stamp file records how each set was
    made, so a changed model or rank set rewrites them)."""
    tag = f"r{'-'.join(map(str, w.ranks))}_{'-'.join(t.replace('_proj', '') for t in w.targets)}"
    folder = root / f"adapters_{tag}"
    stamp = {"dims": asdict(dims), "ranks": list(w.ranks), "targets": list(w.targets), "version": 1}
    stamp_file = folder / "stamp.json"
    if not (stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp):
        stamp_file.unlink(missing_ok=True)
        for d in folder.glob("a*"):
            for f in d.iterdir():
                f.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps(stamp))
    paths = [folder / f"a{i:04d}" for i in range(w.n_adapters)]
    todo = [i for i, p in enumerate(paths) if not (p / "adapter_model.safetensors").exists()]
    for k, i in enumerate(todo):
        write_adapter(paths[i], dims, w.rank_of(i), w.targets, seed=10_000 + i, base_model=base_model)
        if log and (k + 1) % 200 == 0:
            log(f"  wrote {k + 1}/{len(todo)} adapters to {folder}")
    return paths
