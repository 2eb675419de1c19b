"""`AdapterConfig`: PEFT `LoraConfig` field names plus `variant`, JSON round trip, and target matching."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError, UnsupportedFeatureError

PEFT_VERSION = "0.21.2"  # the PEFT file format we write and were tested against

# PEFT `LoraConfig` keys we accept only at these (default) values; anything else names a feature we lack.
PEFT_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# PEFT keys that carry no meaning for the adapter's math.
PEFT_INERT_DEFAULTS: dict[str, Any] = {
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
    "peft_version": PEFT_VERSION,
    "auto_mapping": None,
    "runtime_config": None,
}
# `init_lora_weights` values; data-driven ones (PiSSA, EVA, ...) arrive with later issues.
INIT_CHOICES = (True, False, "gaussian")
PEFT_DATA_INITS = ("pissa", "olora", "eva", "corda", "loftq", "lora_ga", "orthogonal", "mica")
BIAS_CHOICES = ("none",)
DEFAULT_TARGETS = {  # PEFT's per-architecture defaults for `target_modules=None`
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 ViT attention names (PEFT has no LoRA default for ViT)
}


@dataclass
class AdapterConfig:
    """One adapter's settings. Field names follow PEFT's `LoraConfig`; `variant` picks the method.

    Scaling (`use_rslora`: α/√r instead of α/r), `variant` and `init_lora_weights` are independent.
    `use_dora=True` is the same as `variant="dora"`. `fan_in_fan_out` is kept for file compatibility;
    as in PEFT the module type decides it (transformers `Conv1D` stores (in, out), `nn.Linear` (out, in)).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    bias: str = "none"
    variant: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        from .variants import get_variant  # late: variants import this module

        _check_types(self)
        if self.use_dora and self.variant not in ("lora", "dora"):
            raise ConfigError(f"use_dora=True conflicts with variant={self.variant!r}; use one of them")
        if self.use_dora:
            self.variant = "dora"
        self.use_dora = self.variant == "dora"
        init_variant = _init_variant(self.init_lora_weights)
        if init_variant and self.variant in ("lora", init_variant[0]) and isinstance(self.options, dict):
            # PEFT's spelling ("pissa", "pissa_niter_4", "olora") of an init that is a variant here
            self.variant, self.init_lora_weights = init_variant[0], True
            self.options = {**init_variant[1], **self.options}
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be an object mapping option names to values, got {self.options!r}")
        parsed = get_variant(self.variant).parse_options(self.options)  # raises UnknownVariantError, ConfigError
        self.options = {} if parsed is None else dataclasses.asdict(parsed)  # every option, defaults filled in
        _check_rank("r", self.r)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in INIT_CHOICES:
            peft_init = isinstance(self.init_lora_weights, str) and self.init_lora_weights.split("_niter_")[0] in \
                PEFT_DATA_INITS
            raise (UnsupportedFeatureError if peft_init else ConfigError)(
                f"init_lora_weights={self.init_lora_weights!r} is not implemented; supported: {INIT_CHOICES}")
        if self.bias not in BIAS_CHOICES:
            raise UnsupportedFeatureError(
                f"bias={self.bias!r} is not implemented (training base-layer biases); supported: {BIAS_CHOICES}")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError("layers_to_transform needs target_modules as a list, not a regex string")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) \
                else list(self.modules_to_save)

    # ---- scale, rank, alpha per module -------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return self.rank_pattern[key] if (key := pattern_key(self.rank_pattern, module_path)) else self.r

    def alpha_for(self, module_path: str) -> float:
        return self.alpha_pattern[key] if (key := pattern_key(self.alpha_pattern, module_path)) else self.lora_alpha

    def scale_for(self, module_path: str) -> float:
        r = self.rank_for(module_path)
        return self.alpha_for(module_path) / (math.sqrt(r) if self.use_rslora else r)

    # ---- dict / JSON -------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from a dict: our own keys, or a PEFT `adapter_config.json`.

        PEFT keys for features we lack are refused by name unless at their default; any other
        unknown key is an error naming it and the valid keys.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if peft_type not in (None, "LORA"):  # a variant's own format (e.g. PEFT's VERA) → our keys
            from .variants import get_variant, variant_for_peft_type
            data = get_variant(variant_for_peft_type(peft_type, data.get("variant"), False)).config_from_peft(data)
            peft_type = None
        for key, default in PEFT_UNSUPPORTED_DEFAULTS.items():
            if key in data and data.pop(key) not in (default, [], {}, None, False):
                raise UnsupportedFeatureError(f"PEFT option {key!r} is set in this config; lorakit does not "
                                              f"implement it and will not silently ignore it")
        for key in PEFT_INERT_DEFAULTS:
            data.pop(key, None)
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(cls.fields())}")
        if peft_type == "LORA" and _init_variant(data.get("init_lora_weights")):
            raise UnsupportedFeatureError(
                f"this PEFT LoRA file has init_lora_weights={data['init_lora_weights']!r}: its A, B act on a residual "
                f"of the base weights that the file does not carry; convert it with PEFT's save_pretrained("
                f"path_initial_model_for_weight_conversion=...) (a plain rank-2r LoRA on the original base)")
        if peft_type is not None:  # "LORA": lora or dora
            from .variants import variant_for_peft_type
            data["variant"] = variant_for_peft_type(peft_type, data.get("variant"), data.get("use_dora", False))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_peft_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content: PEFT's full `LoraConfig` dump for LoRA/DoRA, sorted keys.

        Variants PEFT cannot represent get their own `peft_type` and keep `variant`, so PEFT refuses them.
        """
        from .variants import get_variant

        own = get_variant(self.variant).peft_config(self)
        if own is not None:
            return dict(sorted(own.items()))
        out = {**PEFT_UNSUPPORTED_DEFAULTS, **PEFT_INERT_DEFAULTS, **self.to_dict()}
        out.pop("runtime_config")
        out["inference_mode"] = True
        out["peft_type"] = get_variant(self.variant).peft_type
        if out["peft_type"] == "LORA":
            out.pop("variant")
            out.pop("options")
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_peft_dict(), indent=2, sort_keys=True)


def _init_variant(init: Any) -> Optional[tuple[str, dict[str, Any]]]:
    """(variant, options) for PEFT's `init_lora_weights` spellings of PiSSA and OLoRA, else None."""
    if init in ("pissa", "olora"):
        return init, {}
    head, _, niter = init.partition("_niter_") if isinstance(init, str) else ("", "", "")
    return ("pissa", {"niter": int(niter)}) if head == "pissa" and niter.isdigit() else None


def _check_types(config: AdapterConfig) -> None:
    """ConfigError for values of the wrong type (a JSON file can hold anything)."""
    def number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def names(v):
        return v is None or isinstance(v, str) or (isinstance(v, (list, tuple, set))
                                                   and all(isinstance(x, str) for x in v))

    def layers(v):
        return v is None or integer(v) or (isinstance(v, (list, tuple)) and all(integer(i) for i in v))

    def by_name(v):
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)

    checks = {"lora_alpha": (number, "a finite number"), "lora_dropout": (number, "a number in [0, 1)"),
              "layers_to_transform": (layers, "an int, a list of ints, or null")}
    checks.update({k: (lambda v: isinstance(v, bool), "true or false")
                   for k in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode")})
    checks.update({k: (names, "a string, a list of strings, or null")
                   for k in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save")})
    checks.update({k: (by_name, "an object mapping module names to values") for k in ("rank_pattern", "alpha_pattern")})
    for key, (ok, expected) in checks.items():
        if not ok(getattr(config, key)):
            raise ConfigError(f"{key} must be {expected}, got {getattr(config, key)!r}")
    for key, value in config.alpha_pattern.items():
        if not number(value):
            raise ConfigError(f"alpha_pattern[{key!r}] must be a finite number, got {value!r}")


def _check_rank(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{label} must be a positive int, got {value!r}")


# ---- target matching (PEFT semantics) ------------------------------------------------------------
def pattern_key(patterns: dict[str, Any], module_path: str) -> Optional[str]:
    """First key (dict order) that matches the end of `module_path` at a dot boundary, as PEFT does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def name_matches(spec: Union[str, list[str]], module_path: str) -> bool:
    """A str is a regex that must match the whole path; a list matches exact names or dotted suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module_path) is not None
    return any(module_path == t or module_path.endswith("." + t) for t in spec)


def layer_index(module_path: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    """The layer number in a path: the first numbered segment, or the number after `layers_pattern`."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", module_path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", module_path))), None)
    return int(m.group(1)) if m else None


def is_targeted(config: AdapterConfig, module_path: str, targets: Union[str, list[str]]) -> bool:
    """PEFT's `check_target_module_exists`: exclusions, modules_to_save, targets, layer selection."""
    if config.exclude_modules and name_matches(config.exclude_modules, module_path):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module_path)
                                      for m in config.modules_to_save):
        return False
    if not name_matches(targets, module_path):
        return False
    wanted = config.layers_to_transform
    if isinstance(targets, str) or wanted is None or wanted == [] or module_path in targets:
        return True  # as PEFT: a target given as its exact path is not subject to layer selection
    index = layer_index(module_path, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted
