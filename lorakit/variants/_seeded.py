"""Shared pieces of the seeded-basis variants (VeRA, RandLoRA): the generator, the basis checksum, option checks
and the PEFT config keys these tuners have in common.

Bases are rebuilt from `projection_prng_key` on every inject and load, with the same torch calls PEFT makes, so a
PEFT file saved without its bases (`save_projection=False`) loads bit-exactly. Such a file only works while
torch's CPU generator produces the same stream; when lorakit writes one it records
`"<generator>:sha256:<hex>"` of the generated bases in the `projection_checksum` option (file key
`lorakit_projection_checksum`, which PEFT ignores with a warning), and a load whose regenerated bases differ
raises StateDictError instead of silently changing the adapter. `record_or_verify` also serves Uni-LoRA's
seeded index assignment (numpy's stream, `index_checksum`).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import Optional

import torch

from ..config import PEFT_VERSION
from ..errors import ConfigError, StateDictError, TargetError, UnsupportedFeatureError
from ..kinds import LinearKind

GENERATOR = "torch.Generator(cpu,mt19937)"
CHECKSUM_KEY = "lorakit_projection_checksum"  # our extra key in PEFT's adapter_config.json
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def checksum(*tensors: torch.Tensor) -> str:
    """`<generator>:sha256:<hex>` over each tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return f"{GENERATOR}:sha256:{h.hexdigest()}"


def check_seed_options(opts) -> None:
    """ConfigError naming `projection_prng_key`, `save_projection` or `projection_checksum` when invalid."""
    key = opts.projection_prng_key
    if isinstance(key, bool) or not isinstance(key, int) or not SEED_RANGE[0] <= key <= SEED_RANGE[1]:
        raise ConfigError(f"option projection_prng_key must be an int in [-2**63, 2**64 - 1], got {key!r}")
    if not isinstance(opts.save_projection, bool):
        raise ConfigError(f"option save_projection must be true or false, got {opts.save_projection!r}")
    if opts.projection_checksum is not None and not (
            isinstance(opts.projection_checksum, str) and ":sha256:" in opts.projection_checksum):
        raise ConfigError(f"option projection_checksum must be null or '<generator>:sha256:<hex>' as lorakit "
                          f"writes it, got {opts.projection_checksum!r}")


def check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"option {name} must be a finite number, got {value!r}")


def check_config(variant: str, config, sites) -> None:
    """What PEFT's format for `variant` cannot hold, refused by name: non-Linear layers, per-layer ranks or alphas,
    exclusions, rsLoRA scaling and `init_lora_weights="gaussian"`."""
    for site in sites:
        if type(site.kind) is not LinearKind:
            raise TargetError(f"{variant} adapts nn.Linear and transformers Conv1D layers only (as PEFT); "
                              f"{site.path!r} is {type(site.kind.base).__name__}")
    unsupported = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "use_rslora": False}
    for key, default in unsupported.items():
        if getattr(config, key) not in (default, [], {}, None):
            raise UnsupportedFeatureError(f"{key} is not supported by {variant} (one shared basis of rank r; "
                                          f"PEFT's {variant} format has no {key})")
    if config.init_lora_weights not in (True, False):
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} has no meaning for {variant}; "
                          f"use true (default init) or false (random, non-identity)")


def note_layout(config, sites) -> None:
    """Set `fan_in_fan_out` as PEFT leaves it after injection (true on transformers Conv1D layers), so the config
    file matches PEFT's; the layers' own type decides the math either way."""
    config.fan_in_fan_out = any(site.kind.transposed for site in sites)


def largest_shape(sites) -> tuple[int, int]:
    """(out, in): the largest output and input sizes over the adapted layers (PEFT's `_find_dim`)."""
    return max(s.kind.out_features for s in sites), max(s.kind.in_features for s in sites)


def record_or_verify(config, digest: str, what: str, *, seed_key: str = "projection_prng_key",
                     checksum_key: str = "projection_checksum", save_key: str = "save_projection",
                     library=torch) -> None:
    """Unless the state is saved (option `save_key` true): record `digest` of the state regenerated from the seed
    in the config's options (`checksum_key`; `prepare` gives `build_shared` the adapter's own config), or compare it
    with the recorded one and raise StateDictError on a mismatch (the random stream of `library` — torch for the
    seeded bases, numpy for Uni-LoRA's indices — changed, or the config is for other layer sizes). `what` names
    the state in the message ("vera bases")."""
    if config.options[save_key]:
        return
    recorded = config.options.get(checksum_key)
    if recorded is None:
        config.options[checksum_key] = digest
    elif recorded != digest:
        lib = library.__name__
        raise StateDictError(
            f"{what} regenerated from {seed_key}={config.options[seed_key]} do not match the recorded "
            f"{checksum_key}: recorded {recorded}, regenerated {digest} with {lib} {library.__version__}. Either "
            f"{lib}'s random stream changed since the adapter was saved (load it with the {lib} version that wrote "
            f"it, then save it with {save_key}=true), or the adapter was made for layers of other sizes")


# ---- PEFT config files -----------------------------------------------------------------------------
COMMON_KEYS = ("base_model_name_or_path", "bias", "fan_in_fan_out", "layers_pattern", "layers_to_transform",
               "modules_to_save", "r", "revision", "target_modules", "task_type")
SEED_OPTIONS = ("projection_prng_key", "save_projection")


def peft_config(config, peft_type: str, dropout_key: str, option_keys: tuple[str, ...],
                extra: Optional[dict] = None) -> dict:
    """The adapter_config.json PEFT writes for a seeded-basis tuner, plus our checksum key when one is recorded."""
    out = {k: getattr(config, k) for k in COMMON_KEYS}
    out.update({k: config.options[k] for k in option_keys})
    out.update(auto_mapping=None, inference_mode=True, init_weights=config.init_lora_weights is not False,
               peft_type=peft_type, peft_version=PEFT_VERSION, **{dropout_key: config.lora_dropout}, **(extra or {}))
    if not config.options["save_projection"] and config.options.get("projection_checksum"):
        out[CHECKSUM_KEY] = config.options["projection_checksum"]
    return out


def config_from_peft(data: dict, variant: str, dropout_key: str, option_keys: tuple[str, ...],
                     renames: Optional[dict] = None) -> dict:
    """AdapterConfig keys from a PEFT config of a seeded-basis tuner; keys left unknown are refused by from_dict."""
    data = dict(data)
    for key in ("auto_mapping", "peft_version"):
        data.pop(key, None)
    out = {"variant": variant, "options": {k: data.pop(k) for k in option_keys if k in data}}
    if CHECKSUM_KEY in data:
        out["options"]["projection_checksum"] = data.pop(CHECKSUM_KEY)
    if dropout_key in data:
        out["lora_dropout"] = data.pop(dropout_key)
    if "init_weights" in data:
        init = data.pop("init_weights")
        if not isinstance(init, bool):
            raise ConfigError(f"init_weights must be true or false, got {init!r}")
        out["init_lora_weights"] = init
    for peft_key, ours in (renames or {}).items():
        if peft_key in data:
            out[ours] = data.pop(peft_key)
    out.update(data)
    return out
