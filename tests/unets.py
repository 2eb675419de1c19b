"""Shared inputs of the diffusion tests: a seeded tiny UNet with random LoRAs and a float64 prompt batch."""
import torch

from lorakit.compose.diffusion import add_random_loras, embed, tiny_text_encoder, tiny_unet


def unet_with(names):
    """The tests' tiny UNet in float64 with one random LoRA (B ≠ 0) per name on the attention projections."""
    return add_random_loras(tiny_unet().double(), names)


def prompt_batch():
    """(latents, cond, uncond) for a batch of 2, float64: random prompt ids and the empty prompt (bos, eos, padding)."""
    encoder = tiny_text_encoder()
    ids = torch.randint(1, 98, (2, 16), generator=torch.Generator().manual_seed(1))
    empty = torch.zeros(2, 16, dtype=torch.long)
    empty[:, 0], empty[:, 1] = 98, 99
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return latents, embed(encoder, ids).double(), embed(encoder, empty).double()
