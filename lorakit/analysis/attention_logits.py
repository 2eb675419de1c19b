"""Attention-logit monitoring during training: the largest |q·k|/√d_head each decoder layer computes.

"Computational Limits of Low-Rank Adaptation (LoRA) for Transformer-Based Models" (Hu et al., 2024) shows that
efficient LoRA fine-tuning needs the attention-logit inputs to stay small (their norms bounded); this measures them.

`AttentionLogitMonitor(every=N)` is a `Trainer` step hook (`Trainer(..., hooks=[AttentionLogitMonitor(N)])`, or
`attention_logit_every: N` in a run's settings / `--attention-logit-every N` on `lorakit train`). On every N-th
optimizer step it measures that step's own training forwards (all its micro-batches, with the weights before the
step's update: the q and k the attention really used, adapters and their dropout included) and adds to the step's
logged record (`metrics.jsonl`):
- `attn_logit_max/<i>`: for decoder layer i, max over heads, rows and causal pairs of real (not padded) tokens of
  |q·k| · scaling, where scaling is the layer's own (1/√d_head in Llama, Mistral, Qwen2);
- `attn_logit_max`: the max over layers.
Its forward hooks exist only while a monitored step runs and only record in training mode (evaluations between
steps are not measured); they are all removed when training ends.

Fused attention kernels never expose the scores, so they are recomputed: hooks keep the outputs of each attention
module's `q_proj` and `k_proj`; when the module returns, its `position_embeddings` (cos, sin) are applied with
transformers' `apply_rotary_pos_emb`, key heads are shared over query-head groups (grouped-query attention), keys a
KV cache holds (a shared prompt prefix) are included, and the padding mask is the `attention_mask` the decoder
received. Attention modules must have `q_proj`, `k_proj` and `head_dim` (the Llama layout); layers that normalise q
and k per head (Qwen3, OLMo2) are refused.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["AttentionLogitMonitor", "attention_modules", "max_attention_logit"]

KEY = "attn_logit_max"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of `model` in layer order (those with `q_proj`, `k_proj` and `head_dim`)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "q_proj", None), nn.Module)
             and isinstance(getattr(m, "k_proj", None), nn.Module) and hasattr(m, "head_dim")]
    if not found:
        raise ConfigError(f"attention-logit monitoring needs decoder attention modules with q_proj, k_proj and "
                          f"head_dim (Llama, Mistral, Qwen2 layout); {type(model).__name__} has none")
    for m in found:
        if hasattr(m, "q_norm") or hasattr(m, "k_norm"):
            raise ConfigError(f"attention-logit monitoring does not support {type(m).__name__}: it normalises q "
                              f"and k per head after q_proj/k_proj")
    return found


def _decoder(model: nn.Module) -> nn.Module:
    """The module whose forward receives the 2-D padding mask (transformers' `get_decoder`, else the model)."""
    try:
        return model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return model


def max_attention_logit(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> float:
    """max |q·k|·scaling over query heads and causal pairs of real tokens.

    q: (B, Hq, T, D) queries of the T newest positions; k: (B, Hkv, S, D) keys of all S ≥ T positions (Hq a multiple
    of Hkv: query head h uses key head h // (Hq / Hkv)); mask: (B, S) 1 for real tokens (None: all real). Query i
    sits at position S − T + i and sees keys 0..S − T + i."""
    batch, heads, t, _ = q.shape
    s, group = k.shape[2], heads // k.shape[1]
    past = s - t
    device = q.device
    allowed = torch.arange(s, device=device)[None, :] <= past + torch.arange(t, device=device)[:, None]  # (T, S)
    if mask is not None:
        real = mask.to(device=device, dtype=torch.bool)
        allowed = allowed[None] & real[:, None, :] & real[:, past:, None]  # (B, T, S)
    best = torch.zeros((), device=device)
    for h in range(heads):  # one head at a time: (B, T, S) scores, never (B, H, T, S)
        scores = torch.matmul(q[:, h].float(), k[:, h // group].float().transpose(-1, -2)).abs()
        best = torch.maximum(best, scores.masked_fill(~allowed, 0).max())
    return float(best) * scaling


class _Layer:
    """The captured projections of one attention module during a forward."""

    def __init__(self, index: int, module: nn.Module):
        self.index, self.module, self.q, self.k = index, module, None, None


class AttentionLogitMonitor:
    """Trainer step hook: every `every` optimizer steps, log the max attention logit per layer (module docstring)."""

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"attention-logit monitoring: every must be an integer ≥ 1, got {every!r}")
        self.every = every
        self._layers: list[_Layer] = []
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._maxima: dict[int, float] = {}

    # ---- trainer hooks -------------------------------------------------------------------------
    def before_training(self, trainer) -> None:
        self._layers = [_Layer(i, m) for i, m in enumerate(attention_modules(trainer.model))]
        self._arm_if_due(trainer, trainer.step + 1)

    def after_optimizer_step(self, trainer) -> None:
        step = trainer.step + 1  # the step just taken (the trainer counts it after its hooks)
        if self._handles:
            self._disarm()
            values = self._reduce(trainer)
            if values:
                trainer.add_step_metrics(values)
        self._arm_if_due(trainer, step + 1)

    def after_training(self, trainer) -> None:
        self._disarm()

    # ---- hooks on the model --------------------------------------------------------------------
    def _arm_if_due(self, trainer, step: int) -> None:
        if step % self.every or step > trainer.total_steps or self._handles:
            return
        self._maxima, self._mask = {}, None
        self._handles.append(_decoder(trainer.model).register_forward_pre_hook(self._keep_mask, with_kwargs=True))
        for layer in self._layers:
            attn = layer.module
            self._handles += [attn.q_proj.register_forward_hook(lambda m, a, out, lay=layer: setattr(lay, "q", out)),
                              attn.k_proj.register_forward_hook(lambda m, a, out, lay=layer: setattr(lay, "k", out)),
                              attn.register_forward_hook(lambda m, a, kw, out, lay=layer: self._measure(lay, kw),
                                                         with_kwargs=True)]

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            layer.q = layer.k = None
        self._mask = None

    def _keep_mask(self, module, args, kwargs) -> None:
        if module.training:
            self._mask = kwargs.get("attention_mask")

    @torch.no_grad()
    def _measure(self, layer: _Layer, kwargs: dict) -> None:
        attn, q_out, k_out = layer.module, layer.q, layer.k
        layer.q = layer.k = None
        if not attn.training or q_out is None or k_out is None:
            return
        d = attn.head_dim
        q = q_out.detach().unflatten(-1, (-1, d)).transpose(1, 2)  # (B, Hq, T, D)
        k = k_out.detach().unflatten(-1, (-1, d)).transpose(1, 2)  # (B, Hkv, T, D)
        if kwargs.get("position_embeddings") is not None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            cos, sin = kwargs["position_embeddings"]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = _cached_keys(kwargs, attn, layer.index, k)
        mask = self._mask
        if mask is not None and (mask.dim() != 2 or mask.shape != (k.shape[0], k.shape[2])):
            mask = None  # not a (rows, positions) padding mask of these keys: causal pairs of all tokens
        scaling = float(getattr(attn, "scaling", d ** -0.5))
        value = max_attention_logit(q, k, scaling, mask)
        self._maxima[layer.index] = max(value, self._maxima.get(layer.index, float("-inf")))

    def _reduce(self, trainer) -> dict[str, float]:
        """`attn_logit_max/<i>` and their max, over this step's micro-batches (and processes, under torchrun)."""
        values = torch.tensor([self._maxima.get(layer.index, float("-inf")) for layer in self._layers],
                              dtype=torch.float64, device=trainer.device)
        if trainer.procs.world_size > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        out = {f"{KEY}/{layer.index}": v for layer, v in zip(self._layers, values.tolist()) if v != float("-inf")}
        if out:
            out[KEY] = max(out.values())
        return out


def _cached_keys(kwargs: dict, attn: nn.Module, index: int, new: torch.Tensor) -> torch.Tensor:
    """All keys the attention saw: a KV cache's keys for this layer (already rotated; they end with `new`) when a
    cache was passed, else `new`."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if not layers:
        return new
    keys = getattr(layers[getattr(attn, "layer_idx", index)], "keys", None)
    if keys is None or keys.dim() != 4 or keys.shape[2] < new.shape[2] or keys.shape[:2] != new.shape[:2]:
        return new
    return keys
