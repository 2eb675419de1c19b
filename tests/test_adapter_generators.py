"""Adapter generators (`lorakit.compose.generate`): ICM-LoRA's conditional VAE with the authors' layout, its loss,
that it learns a condition, ICM-LoRA's task vector and SG-LoRA's semantic weights."""
import dataclasses

import pytest
import torch
from transformers import BatchEncoding

import lorakit
from lorakit.compose.flat import Standardiser, read, unflatten
from lorakit.compose.generate import (CHANNELS, ConvCVAE, fit_cvae, fuse, semantic_weights, task_vector)
from lorakit.compose.flat import FlatAdapter
from lorakit.errors import ConfigError

from contract import perturb
from models import llama

POOL_SIZE = 4 * (4 * 576 + 576 * 4 + 4 * 576 + 192 * 4)  # r 4 on q, v of SmolLM2's last 4 layers: 30,720 values


def test_layout_is_the_authors():
    model = ConvCVAE(POOL_SIZE, 576)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv1d)]
    ups = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose1d)]
    assert [c.out_channels for c in convs] == list(CHANNELS) and all(c.stride == (2,) for c in convs)
    assert all(c.kernel_size == (7,) for c in convs + ups) and len(ups) == 12
    assert [u.out_channels for u in ups] == list(CHANNELS[::-1][1:]) + [CHANNELS[0]]
    assert model.padded == 32768 and model.last == 8 and model.to_latent.in_features == 8 * 8
    assert model.fc_mu.in_features == 256 + 576 and model.to_decode.in_features == 256 + 576
    c = torch.randn(3, 576)
    mu, log_var = model.encode(torch.randn(3, POOL_SIZE), c)
    assert mu.shape == log_var.shape == (3, 256)
    assert model.decode(mu, c).shape == (3, POOL_SIZE) and model.sample(c).shape == (3, POOL_SIZE)


def test_loss_is_mse_plus_beta_kl():
    model = ConvCVAE(300, 5, latent=16, channels=(4, 8, 8, 4)).eval()  # eval: BatchNorm deterministic
    x, c = torch.randn(4, 300), torch.randn(4, 5)
    torch.manual_seed(0)
    total, recon, kld = model.loss(x, c)
    mu, log_var = model.encode(x, c)
    torch.manual_seed(0)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
    want_recon = ((model.decode(z, c) - x) ** 2).mean()
    want_kld = sum(-0.5 * (1 + log_var[i] - mu[i] ** 2 - log_var[i].exp()).sum() for i in range(4)) / 4
    torch.testing.assert_close(recon, want_recon)
    torch.testing.assert_close(kld, want_kld)
    torch.testing.assert_close(total, want_recon + 0.005 * want_kld)
    with pytest.raises(ConfigError, match="conditions"):
        model.loss(x, torch.randn(4, 6))
    with pytest.raises(ConfigError, match="vectors"):
        model.loss(torch.randn(4, 301), c)


def test_it_learns_what_the_condition_asks_for():
    """Two tasks: vectors ±p + noise with conditions e₀ / e₁; samples for each condition land near its own mean.
    With the authors' β = 0.005 the latent carries the task and samples from the prior ignore the condition (their
    code trains one CVAE per task, with one condition); β = 1 makes the decoder read the condition."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(200, generator=g)
    x = torch.cat([p + 0.3 * torch.randn(16, 200, generator=g), -p + 0.3 * torch.randn(16, 200, generator=g)])
    c = torch.cat([torch.eye(2)[[0] * 16], torch.eye(2)[[1] * 16]])
    torch.manual_seed(0)
    model = ConvCVAE(200, 2, latent=8, channels=(8, 16, 16, 8), kld_weight=1.0)
    losses = fit_cvae(model, x, c, steps=300, batch=8, lr=3e-3, progress=False)
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:20]) / 20
    out = model.sample(torch.eye(2)[[0, 0, 0, 1, 1, 1]], torch.Generator().manual_seed(1))
    own = torch.stack([(out[i] - (p if i < 3 else -p)).norm() for i in range(6)])
    other = torch.stack([(out[i] - (-p if i < 3 else p)).norm() for i in range(6)])
    assert (own < 0.5 * other).all(), (own, other)
    with pytest.raises(ConfigError, match="batch"):
        fit_cvae(model, x, c, steps=1, batch=1)


class CharTokenizer:
    """Characters as token ids (1..120), padded with 0 on `padding_side` (left by default, as generation wants)."""

    padding_side = "left"

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=512):
        ids = [[ord(ch) % 120 + 1 for ch in t][:max_length] for t in texts]
        n = max(len(i) for i in ids)
        rows = [([0] * (n - len(i)) + i, [0] * (n - len(i)) + [1] * len(i)) if self.padding_side == "left"
                else (i + [0] * (n - len(i)), [1] * len(i) + [0] * (n - len(i))) for i in ids]
        return BatchEncoding({"input_ids": torch.tensor([r[0] for r in rows]),
                              "attention_mask": torch.tensor([r[1] for r in rows])})


def test_task_vector_averages_the_final_tokens_last_hidden_state():
    model = llama()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    tok = CharTokenizer()
    prompts = ["a short one", "a much longer prompt than the first", "mid size prompt"]
    got = task_vector(model, tok, prompts, batch_size=2)
    with torch.no_grad():
        alone = [model(**tok([p]), output_hidden_states=True).hidden_states[-1][0, -1] for p in prompts]
    torch.testing.assert_close(got, torch.stack(alone).mean(0), rtol=1e-5, atol=1e-5)
    assert tok.padding_side == "left"  # restored
    with lorakit.disabled(model):
        assert not torch.allclose(task_vector(model, tok, prompts), got)  # the adapter counts
    with pytest.raises(ConfigError):
        task_vector(model, tok, "one string")


def test_semantic_weights_keep_the_top_k_and_fuse_sums_them():
    experts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    w = semantic_weights(torch.tensor([1.0, 0.1]), experts, k=2, temperature=0.1)
    assert w[2] == 0 and w[3] == 0 and w[0] > w[1] > 0 and abs(w.sum().item() - 1) < 1e-6
    cos = torch.nn.functional.normalize(experts[:2], dim=-1) @ torch.nn.functional.normalize(torch.tensor([1.0, 0.1]),
                                                                                            dim=0)
    torch.testing.assert_close(w[:2], torch.softmax(cos / 0.1, 0))
    rows = torch.randn(4, 3)
    torch.testing.assert_close(fuse(w, rows), w[0] * rows[0] + w[1] * rows[1])
    with pytest.raises(ConfigError, match="k must be"):
        semantic_weights(torch.ones(2), experts, k=5)


def test_a_generated_vector_becomes_a_loadable_adapter(tmp_path):
    model = llama()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    layout, raw = read(lorakit.save_adapter(model, tmp_path / "src"))
    std = Standardiser.pooled(layout, raw[None])
    cvae = ConvCVAE(layout.size, 3, latent=8, channels=(4, 8, 4))
    z = cvae.sample(torch.randn(1, 3))[0]
    out = unflatten(dataclasses.replace(FlatAdapter(std.standardise(raw), std), vector=z.double()), tmp_path / "gen")
    fresh = lorakit.load_adapter(llama(), out)
    for path, layer in lorakit.model.wrappers(fresh):
        v = layer.adapters["default"]
        assert v.r == 4 and v.scale == 4.0 and torch.isfinite(v.lora_A).all()
