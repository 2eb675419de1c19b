"""A Llama-architecture decoder (Llama, Mistral, Qwen2 configs) that runs one step over flattened tokens.

One forward covers the tokens of many sequences at once — prefills and decodes mixed — as a (tokens, hidden)
matrix: every projection is one GEMM for the whole step (q/k/v fused, gate/up fused), LoRA add-ons come from
the step's `LoraStep`, and attention reads and writes the paged KV cache. Prefill attention runs per sequence
on its own fresh K/V (causal); all decodes of the step share one attention call over their gathered blocks.

Dtype: weights, activations and the KV cache are held in the runner's dtype (fp32, bf16 or fp16), with the
numerics of transformers' model in that dtype (RMSNorm in fp32, RoPE tables cast, logits returned as fp32).
With a 16-bit dtype, steps of few rows may compute in fp32 on fp32 copies of the layer weights
(`use_fp32_below`), since 16-bit GEMMs with few rows are slower than fp32 ones on CPU.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .config import DTYPES, serving_dtype
from .kv_cache import KVCache

ARCHITECTURES = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Dims:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    max_len: int

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[module]


@dataclass
class SeqSlice:
    """One sequence's rows [start, stop) of the step; `context` = its tokens in the cache after this step."""

    start: int
    stop: int
    context: int
    slots: torch.Tensor  # flat KV slots of all `context` tokens

    @property
    def is_decode(self) -> bool:
        return self.stop - self.start == 1 and self.context > 1


@dataclass
class StepBatch:
    tokens: torch.Tensor     # (T,) long
    positions: torch.Tensor  # (T,) long
    seqs: list[SeqSlice]
    lora: object = None      # a LoraStep, or None when no row uses an adapter
    logits_rows: torch.Tensor | None = None  # rows whose logits are wanted (default: each sequence's last)


class LlamaRunner:
    """Weights of a Llama-style causal LM and a step function over a paged KV cache (inference only)."""

    def __init__(self, config, weights: dict[str, torch.Tensor], name: str = "model", dtype: str = "auto"):
        """`dtype`: "auto" (the checkpoint's: config `dtype`/`torch_dtype`, else the weights'), "float32",
        "bfloat16" or "float16" — weights, activations and the KV cache are held in it (see EngineConfig)."""
        self.config, self.name = config, name
        self.dtype = serving_dtype(dtype, checkpoint_dtype(config, weights))
        arch = getattr(config, "model_type", None)
        if arch not in ARCHITECTURES:
            raise ModelError(f"{name}: model_type {arch!r} is not served; supported: {list(ARCHITECTURES)}")
        heads = config.num_attention_heads
        self.dims = Dims(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
                         heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                         head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                         intermediate=config.intermediate_size, rms_eps=config.rms_norm_eps,
                         max_len=config.max_position_embeddings)
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and window < self.dims.max_len:
            raise ModelError(f"{name}: sliding-window attention (window {window} < max_position_embeddings "
                             f"{self.dims.max_len}) is not supported")
        self.inv_freq, self.rope_scale = _rope(config)
        self.fp32_max_rows, self._layers32 = 0, None
        self._load(weights)

    # ---- weights -------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | os.PathLike, dtype: str = "auto", name: str | None = None) -> "LlamaRunner":
        """Read config.json and *.safetensors (sharded or not) of a transformers model directory."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ModelError(f"{directory} is not a model directory (no config.json)")
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{directory} has no *.safetensors weights (pickled .bin weights are never read)")
        try:
            config = AutoConfig.from_pretrained(str(directory))
            weights = {}
            for f in files:
                weights.update(load_file(str(f)))
        except (OSError, ValueError, KeyError, SafetensorError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read the model in {directory}: {e}") from e
        return cls(config, weights, name=name or directory.resolve().name, dtype=dtype)

    @classmethod
    def from_hf(cls, model, dtype: str = "auto") -> "LlamaRunner":
        """From a loaded transformers `LlamaForCausalLM` (or Mistral/Qwen2); copies its weights."""
        return cls(model.config, {k: v.detach() for k, v in model.state_dict().items()}, dtype=dtype)

    def _load(self, w: dict[str, torch.Tensor]) -> None:
        d = self.dims

        def get(key, shape=None, optional=False):
            t = w.get(key)
            if t is None:
                if optional:
                    return None
                raise ModelError(f"{self.name}: weight {key!r} is missing")
            if shape is not None and tuple(t.shape) != shape:
                raise ModelError(f"{self.name}: weight {key!r} has shape {tuple(t.shape)}, expected {shape}")
            return t.to(self.dtype).contiguous()

        self.embed = get("model.embed_tokens.weight", (d.vocab, d.hidden))
        self.norm = get("model.norm.weight", (d.hidden,))
        self.lm_head = get("lm_head.weight", (d.vocab, d.hidden), optional=True)
        if self.lm_head is None:
            if not getattr(self.config, "tie_word_embeddings", False):
                raise ModelError(f"{self.name}: weight 'lm_head.weight' is missing and embeddings are not tied")
            self.lm_head = self.embed
        self.layers = []
        for i in range(d.layers):
            p = f"model.layers.{i}."

            def proj(m, kind):
                fan_in, fan_out = d.projection_shape(m)
                return get(f"{p}{kind}.{m}.weight", (fan_out, fan_in)), get(f"{p}{kind}.{m}.bias", (fan_out,), True)

            (q, qb), (k, kb), (v, vb) = (proj(m, "self_attn") for m in ("q_proj", "k_proj", "v_proj"))
            (o, ob), (g, gb), (u, ub) = proj("o_proj", "self_attn"), proj("gate_proj", "mlp"), proj("up_proj", "mlp")
            down, down_b = proj("down_proj", "mlp")
            self.layers.append(dict(
                attn_norm=get(p + "input_layernorm.weight", (d.hidden,)),
                mlp_norm=get(p + "post_attention_layernorm.weight", (d.hidden,)),
                qkv=torch.cat([q, k, v]), qkv_b=_cat_bias((qb, kb, vb), (q, k, v)),
                o=o, o_b=ob, gate_up=torch.cat([g, u]), gate_up_b=_cat_bias((gb, ub), (g, u)), down=down, down_b=down_b))

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        d = self.dims
        return KVCache(d.layers, num_blocks, block_size, d.kv_heads, d.head_dim, self.dtype)

    def kv_bytes_per_block(self, block_size: int) -> int:
        d = self.dims
        return 2 * d.layers * block_size * d.kv_heads * d.head_dim * self.dtype.itemsize

    def weight_bytes(self) -> int:
        """Bytes of the weights held, fp32 copies for small steps included."""
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        tensors += [t for layers in (self.layers, self._layers32 or []) for layer in layers
                    for t in layer.values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def use_fp32_below(self, max_rows: int) -> None:
        """Run steps of at most `max_rows` rows in fp32, on fp32 copies of the (16-bit) layer weights.

        On CPU, 16-bit GEMMs with a few rows are slower than fp32 ones, while the LM head (one big matrix, bound by
        memory bandwidth) is faster in 16 bits, so it stays 16-bit. No-op for an fp32 model; 0 drops the copies."""
        self.fp32_max_rows = max_rows if self.dtype != torch.float32 else 0
        if not self.fp32_max_rows:
            self._layers32 = None
        elif self._layers32 is None:
            self._layers32 = [{k: None if t is None else t.float() for k, t in layer.items()} for layer in self.layers]

    def compute_dtype(self, rows: int) -> torch.dtype:
        """The dtype a step of `rows` token rows computes in."""
        return torch.float32 if rows <= self.fp32_max_rows else self.dtype

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Run the step's tokens, write their K/V into `cache`, return logits (len(logits_rows), vocab)."""
        d = self.dims
        lora = batch.lora
        compute = self.compute_dtype(len(batch.tokens))
        cos, sin = self._rope_tables(batch.positions, compute)
        write_slots = torch.cat([s.slots[s.context - (s.stop - s.start):] for s in batch.seqs])
        decode_meta = _decode_meta(batch.seqs)
        x = self.embed.index_select(0, batch.tokens).to(compute)
        q_out, kv_out = d.heads * d.head_dim, d.kv_heads * d.head_dim
        for i, layer in enumerate(self.layers if compute == self.dtype else self._layers32):
            h = _rms_norm(x, layer["attn_norm"], d.rms_eps)
            qkv = F.linear(h, layer["qkv"], layer["qkv_b"])
            if lora is not None:
                lora.apply(i, "qkv", h, qkv)
            q, k, v = qkv.split([q_out, kv_out, kv_out], dim=-1)
            q = _apply_rope(q.view(-1, d.heads, d.head_dim), cos, sin)
            k = _apply_rope(k.view(-1, d.kv_heads, d.head_dim), cos, sin)
            v = v.reshape(-1, d.kv_heads, d.head_dim)
            cache.write(i, write_slots, k, v)
            attn = self._attention(i, q, k, v, batch.seqs, decode_meta, cache)
            o = F.linear(attn, layer["o"], layer["o_b"])
            if lora is not None:
                lora.apply(i, "o", attn, o)
            x = x + o
            h = _rms_norm(x, layer["mlp_norm"], d.rms_eps)
            gu = F.linear(h, layer["gate_up"], layer["gate_up_b"])
            if lora is not None:
                lora.apply(i, "gate_up", h, gu)
            gate, up = gu.split([d.intermediate, d.intermediate], dim=-1)
            act = F.silu(gate).mul_(up)
            down = F.linear(act, layer["down"], layer["down_b"])
            if lora is not None:
                lora.apply(i, "down", act, down)
            x = x + down
        rows = batch.logits_rows
        if rows is None:
            rows = torch.tensor([s.stop - 1 for s in batch.seqs], dtype=torch.long)
        h = _rms_norm(x.index_select(0, rows), self.norm, d.rms_eps)  # in `compute` (a 16-bit norm weight promotes)
        return F.linear(h.to(self.dtype), self.lm_head).float()

    def _attention(self, layer, q, k, v, seqs, decode_meta, cache) -> torch.Tensor:
        d = self.dims
        out = torch.empty(q.shape[0], d.heads * d.head_dim, dtype=q.dtype)
        gqa = d.heads != d.kv_heads
        for s in seqs:
            if s.is_decode:
                continue
            if s.context != s.stop - s.start:
                raise RuntimeError("prefill of a sequence with cached context is not supported")
            qs, ks, vs = (t[s.start:s.stop].transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            out[s.start:s.stop] = o.transpose(0, 1).reshape(s.stop - s.start, -1)
        if decode_meta is not None:
            rows, slots, mask = decode_meta
            kc, vc = (t.to(q.dtype) for t in cache.read(layer, slots.view(-1)))
            n, width = slots.shape
            kc = kc.view(n, width, d.kv_heads, d.head_dim).transpose(1, 2)  # (n, kv_heads, ctx, head_dim)
            vc = vc.view(n, width, d.kv_heads, d.head_dim).transpose(1, 2)
            qd = q.index_select(0, rows).view(n, d.kv_heads, d.heads // d.kv_heads, d.head_dim)
            out.index_copy_(0, rows, _decode_attention(qd, kc, vc, mask).reshape(n, -1))
        return out

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def _decode_meta(seqs: list[SeqSlice]):
    """For all decode rows of a step: (rows, padded slot matrix, attention mask), or None when there are none."""
    decodes = [s for s in seqs if s.is_decode]
    if not decodes:
        return None
    width = max(s.context for s in decodes)
    slots = torch.zeros(len(decodes), width, dtype=torch.long)
    mask = torch.zeros(len(decodes), 1, 1, width, dtype=torch.bool)
    for j, s in enumerate(decodes):
        slots[j, :s.context] = s.slots
        mask[j, 0, 0, :s.context] = True
    rows = torch.tensor([s.start for s in decodes], dtype=torch.long)
    return rows, slots, mask


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query token per sequence: q (n, kv_heads, group, d) against k, v (n, kv_heads, ctx, d); mask (n, 1, 1, ctx).

    Plain matmuls with the query heads of one KV head grouped (no K/V repeat), softmax in fp32. On CPU this is
    several times faster than SDPA's flash kernel for decode, most in bf16 (see BENCHMARKS.md, serving notes)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _cat_bias(biases, weights):
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as transformers' LlamaRMSNorm does."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def checkpoint_dtype(config, weights: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype a checkpoint is stored in: config `dtype` / `torch_dtype`, else its first floating tensor's."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    if isinstance(value, torch.dtype):
        return value
    return next((t.dtype for t in weights.values() if t.is_floating_point()), None)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rope(config) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) of the config's rotary embedding, as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            raise ModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelError(f"rope type {rope_type!r} is not supported")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)
