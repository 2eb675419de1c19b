"""Generating adapter weights without task data: ICM-LoRA and SG-LoRA (training.md §12, compose.md §6).

Both generate a flat, standardised adapter vector (`lorakit.compose.flat`) with one conditional VAE, `ConvCVAE`,
the layout of ICM-LoRA's code (`model/CVAE_design.py` @0b0057c): the vector, zero-padded to a multiple of 2¹², goes
through 12 stride-2 Conv1d stages (kernel 7; channels 8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8; BatchNorm,
LeakyReLU), a Linear to the latent (256), and μ, log σ² from [latent; c]; the decoder maps [z; c] back through a
Linear and 12 stride-2 ConvTranspose1d stages (BatchNorm, ELU) to one channel. Loss: MSE + β·KL (β = 0.005).
They differ in the condition c:

- ICM-LoRA: a task vector, `task_vector(model, tokenizer, prompts)`: the last layer's hidden state at each prompt's
  final token, averaged over the prompts (in-context examples of the task).
- SG-LoRA: the fused semantics of the task's description: `semantic_weights` gives softmax(cos / τ) weights over the
  top-k expert adapters by MiniLM similarity of their descriptions, and `fuse(weights, embeddings)` = Σ αₖ dₖ. The
  same weights over the experts' vectors (`fuse(weights, vectors)`) are the mixture-of-experts baseline.

Choices where the sources are silent or unreleased ([U]):
- The reconstruction loss counts the vector's real values, not the zero padding (the code averages over both).
- β defaults to the code's 0.005, which suits its use: one CVAE per task, every sample with the same condition.
  Across tasks it lets the latent carry the task, and samples from the prior then ignore the condition (a two-task
  test: samples land on either task at random); β = 1 makes the decoder read the condition (tested). Pass
  `kld_weight` when one generator serves several tasks.
- ICM-LoRA's task vector comes from the model the caller passes: the library does not decide which; the transfer
  bench uses the base model on k-shot prompts, since a held-out task has no tuned adapter to run.
- SG-LoRA's condition is the fused MiniLM embedding Σ αₖ dₖ (the paper conditions on fused statistics of the experts'
  parameters; its code was not readable); at training time each checkpoint is conditioned on its own expert's
  description embedding. Defaults k = 4 (the paper's), τ = 0.05 (not stated).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)  # ICM-LoRA's d_model
KLD_WEIGHT = 0.005
LATENT = 256
KERNEL = 7


class ConvCVAE(nn.Module):
    """ICM-LoRA's conditional VAE over flat vectors of `size` values with conditions of `cond_dim` (see the module
    docstring). `loss(x, c)` → (total, reconstruction, KL); `sample(c)` decodes z ~ N(0, I) (eval mode: BatchNorm
    uses its running statistics)."""

    def __init__(self, size: int, cond_dim: int, latent: int = LATENT, kernel: int = KERNEL,
                 channels: Sequence[int] = CHANNELS, kld_weight: float = KLD_WEIGHT):
        super().__init__()
        for name, v in (("size", size), ("cond_dim", cond_dim), ("latent", latent), ("kernel", kernel)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if kernel % 2 == 0 or not channels:
            raise ConfigError(f"kernel must be odd and channels non-empty, got {kernel}, {list(channels)}")
        channels = list(channels)
        block = 2 ** len(channels)
        self.size, self.cond_dim, self.latent, self.kld_weight = size, cond_dim, latent, float(kld_weight)
        self.padded = math.ceil(size / block) * block
        self.last = self.padded // block
        pad = kernel // 2
        stages, width = [], 1
        for h in channels:
            stages.append(nn.Sequential(nn.Conv1d(width, h, kernel, 2, pad), nn.BatchNorm1d(h), nn.LeakyReLU()))
            width = h
        self.encoder = nn.Sequential(*stages)
        self.to_latent = nn.Linear(self.last * channels[-1], latent)
        self.fc_mu = nn.Linear(latent + cond_dim, latent)
        self.fc_var = nn.Linear(latent + cond_dim, latent)
        back = channels[::-1]
        self.to_decode = nn.Linear(latent + cond_dim, self.last * back[0])
        up = [nn.Sequential(nn.ConvTranspose1d(a, b, kernel, 2, pad, output_padding=1), nn.BatchNorm1d(b), nn.ELU())
              for a, b in zip(back, back[1:] + [back[-1]])]
        self.decoder = nn.Sequential(*up, nn.Conv1d(back[-1], 1, kernel, 1, pad))
        self._first = back[0]

    def _check(self, x: Optional[torch.Tensor], c: torch.Tensor) -> None:
        if c.dim() != 2 or c.shape[1] != self.cond_dim:
            raise ConfigError(f"conditions must be (batch, {self.cond_dim}), got {tuple(c.shape)}")
        if x is not None and (x.dim() != 2 or x.shape[1] != self.size or x.shape[0] != c.shape[0]):
            raise ConfigError(f"vectors must be ({c.shape[0]}, {self.size}), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(F.pad(x, (0, self.padded - self.size))[:, None])
        h = torch.cat([self.to_latent(h.flatten(1)), c], dim=-1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.to_decode(torch.cat([z, c], dim=-1)).view(-1, self._first, self.last)
        return self.decoder(h)[:, 0, :self.size]

    def loss(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(MSE + β·KL, MSE over the real values, KL summed over the latent and averaged over the batch)."""
        self._check(x, c)
        mu, log_var = self.encode(x, c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        recon = F.mse_loss(self.decode(z, c), x)
        kld = (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)).mean()
        return recon + self.kld_weight * kld, recon, kld

    @torch.no_grad()
    def sample(self, c: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One generated vector per condition row, (rows, size); the module is left in eval mode."""
        self._check(None, c)
        self.eval()
        z = torch.randn(c.shape[0], self.latent, generator=generator).to(c)
        return self.decode(z, c)


def fit_cvae(model: ConvCVAE, vectors: torch.Tensor, conds: torch.Tensor, steps: int = 2000, batch: int = 8,
             lr: float = 2e-4, seed: int = 0, progress: bool = True) -> list[float]:
    """Train `model` on (vectors (n, size), conditions (n, cond_dim)) for `steps` minibatches of `batch` rows drawn
    with replacement; AdamW at `lr` (ICM-LoRA's 2e-4), cosine decay. Returns the total loss of every step."""
    from tqdm.auto import tqdm

    model._check(vectors, conds)
    for name, v in (("steps", steps), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if batch < 2:
        raise ConfigError("batch must be at least 2 (BatchNorm)")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the reparameterisation noise
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="cvae", unit="step", leave=False, disable=not progress):
        rows = torch.randint(0, vectors.shape[0], (batch,), generator=gen)
        loss = model.loss(vectors[rows], conds[rows])[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def task_vector(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 8,
                max_length: int = 512) -> torch.Tensor:
    """ICM-LoRA's task vector: the last layer's hidden state at each prompt's final real token, averaged over the
    prompts, as a float32 (hidden,) vector. Runs `model` as it is (its active adapters apply)."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("task_vector needs a non-empty list of prompt strings")
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        total = None
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length).to(device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            last = enc["attention_mask"].sum(1) - 1
            picked = hidden[torch.arange(hidden.shape[0], device=device), last].float().sum(0)
            total = picked if total is None else total + picked
    finally:
        tokenizer.padding_side = side
    return (total / len(prompts)).cpu()


def semantic_weights(query: torch.Tensor, experts: torch.Tensor, k: int = 4, temperature: float = 0.05) -> torch.Tensor:
    """SG-LoRA's expert weights for one task description: cosine of `query` (d,) with each expert's description
    embedding `experts` (E, d), the top k kept, softmax(cos / τ) over them, 0 elsewhere; (E,) summing to 1."""
    from .retrieve import mixture_weights

    if query.dim() != 1 or experts.dim() != 2 or experts.shape[1] != query.shape[0]:
        raise ConfigError(f"query must be (d,) and experts (E, d), got {tuple(query.shape)}, {tuple(experts.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts.shape[0]:
        raise ConfigError(f"k must be an integer in [1, {experts.shape[0]}], got {k!r}")
    cos = F.normalize(experts.float(), dim=-1) @ F.normalize(query.float(), dim=0)
    top = cos.topk(k)
    weights = torch.zeros_like(cos)
    weights[top.indices] = mixture_weights(top.values, temperature)
    return weights


def fuse(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σₖ wₖ·rowsₖ: fused description embeddings (SG-LoRA's condition) or fused expert vectors (the mixture
    baseline)."""
    if weights.dim() != 1 or rows.dim() != 2 or rows.shape[0] != weights.shape[0]:
        raise ConfigError(f"weights must be (E,) and rows (E, d), got {tuple(weights.shape)}, {tuple(rows.shape)}")
    return weights.to(rows.dtype) @ rows
