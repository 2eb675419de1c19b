"""RecLoRA banks served per request: the `reclora` body field {bank, user} runs the model with that user's adapter.

A bank (a saved `reclora` adapter: N meta-LoRAs and a gate per layer) is registered at start-up by name. A request's
user vector u picks the adapter the bank computes for u, written as a plain LoRA folder by
`lorakit.variants.reclora.personal_lora` (per layer A_p = Σ w_k A_k, B_p = Σ w_k B_k, w = gate(u); exact) and
registered with the engine under `user:<bank>:<16 hex digits of the SHA-256 of u as float32>`. The server's
MergeCache builds it once and keeps it (LRU, leased per request) as it keeps merged adapters: no user has a weight
set of their own on disk, and the engine serves them with its plain LoRA kernels (rank r, not N·r).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import torch

from ..errors import ConfigError

PREFIX = "user:"
PERSONAL_NAME_RE = re.compile(r"^user:[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[0-9a-f]{16}$")


@dataclasses.dataclass(frozen=True)
class Bank:
    name: str
    folder: Path
    user_dim: int
    rank: int  # the largest per-layer rank of a user's adapter


def personal_name(bank: str, user: list[float]) -> str:
    """The engine name of `bank`'s adapter for user vector `user`: equal vectors (as float32) share one name."""
    digest = hashlib.sha256(torch.tensor(user, dtype=torch.float32).numpy().tobytes()).hexdigest()[:16]
    return f"{PREFIX}{bank}:{digest}"


def open_bank(name: str, folder) -> Bank:
    """Check a RecLoRA bank folder (read in full) and describe it; ConfigError when it is not one."""
    from ..variants.reclora import read_bank

    try:
        _, options, tensors = read_bank(folder)
    except ConfigError as e:
        raise ConfigError(f"--reclora-bank {name}: {e}") from None
    ranks = [t.shape[0] // options.bank_size for k, t in tensors.items() if k.endswith(".reclora_A")]
    if not ranks:
        raise ConfigError(f"--reclora-bank {name}: {folder} adapts no layer")
    return Bank(name, Path(folder), options.user_dim, max(ranks))


def parse_banks(values: list[str]) -> dict[str, str]:
    """`name=folder` items (--reclora-bank) -> {name: folder}."""
    banks = {}
    for item in values:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--reclora-bank {item[:100]!r}: expected NAME=FOLDER")
        if name in banks:
            raise ConfigError(f"--reclora-bank: bank {name!r} is given twice")
        banks[name] = folder
    return banks
