"""Export for vLLM's LoRA loader (`lorakit export --for vllm`), checked against the rules of one vLLM release.

Rules read from vLLM v0.34.0 (the PyPI sdist `vllm-0.34.0.tar.gz`), with their source lines:

- rank: `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16) [vllm/config/lora.py:26,33];
  an adapter whose largest rank (`r` and `rank_pattern`) exceeds it is refused [vllm/lora/peft_helper.py:200-204];
  `r` and every `rank_pattern` value must be positive integers [peft_helper.py:104-113].
- config keys: `r`, `lora_alpha`, `target_modules` are required, unknown keys are ignored [peft_helper.py:27-30,
  162-180]; vLLM reads `bias`, `modules_to_save`, `task_type`, `use_rslora`, `use_dora`, `lora_bias`,
  `init_lora_weights`, `alora_invocation_tokens`, `layer_replication`, `use_bdlora`, `use_qalora`, `rank_pattern`,
  `alpha_pattern` [peft_helper.py:32-49].
- DoRA refused (`use_dora`) [peft_helper.py:67-68]; so are `lora_bias` [69-70], aLoRA [80-81], `layer_replication`
  [82-83], BD-LoRA [84-85], QALoRA [86-87] and `init_lora_weights` other than true/false/gaussian/eva/orthogonal/
  mica/lora_ga (PiSSA, OLoRA, CorDA, LoftQ change the base) [peft_helper.py:71-79,90-101].
- bias: `bias` must be "none" [peft_helper.py:206-207].
- scaling: α/r, or α/√r with `use_rslora`, per module through `rank_pattern` / `alpha_pattern` matched as
  `(.*\\.)?(key)$` on the module name, first match wins (PEFT's rule) [peft_helper.py:124-160]; it is folded into
  lora_B before the kernels run [vllm/lora/lora_weights.py:37-43,135-160].
- modules_to_save: only None or ["classifier", "score"] (classification heads) [peft_helper.py:57-66], at most one
  such full module with a weight [vllm/lora/lora_model.py:178-192]; SEQ_CLS/TOKEN_CLS add them [peft_helper.py:114-119].
- tensor names: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, `.lora_embedding_A` /
  `.lora_embedding_B`, and `<...>.score|classifier.weight|bias` for the head; any other name is "unsupported LoRA
  weight" [vllm/lora/utils.py:183-236]; the file is `adapter_model.safetensors` [lora_model.py:243,288-304].
- targets: vLLM wraps linear layers (LinearBase, MoE) and the model's `embedding_modules` (Llama: embed_tokens,
  lm_head [vllm/model_executor/models/llama.py:479-482]) [utils.py:248-298]; a tensor on another module is an
  unexpected module [lora_model.py:250-286]; an embedding LoRA's `lora_embedding_A` must span the base vocabulary
  [lora_model.py:160-168].
- dtype: tensors are cast to `lora_dtype` (auto: the model's dtype) at load [lora_model.py:169,173;
  vllm/lora/worker_manager.py:146], so any floating dtype is accepted.

Folded (exact): every scale (α, rsLoRA, alpha_pattern, a variant's own scales) goes into lora_B with lora_alpha = r;
PiSSA/OLoRA-style inits become the change relative to the original base (init_lora_weights true); VeRA, LoRA-XS, ...
become their ΔW = B·A. Refused, with the rule: DoRA magnitudes (full-rank rescaling: squeeze or merge instead),
variants with no exact low-rank form, conv layers, trained copies other than a classifier/score head, ranks > 512.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import VllmIncompatibleError
from ..kinds import EmbeddingKind, LinearKind, QuantLinearKind
from ..layers import AdaptedLayer, TrainedCopy
from ..model import get_config, wrappers
from .export import export_lora
from .files import CONFIG_NAME, WEIGHTS_NAME

VLLM_RELEASE = "v0.34.0"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py:26
HEAD_MODULES = ("classifier", "score")  # peft_helper.py:57-66
SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # peft_helper.py:94-101
REFUSED_FLAGS = {  # config key -> (what vLLM calls it, source)
    "use_dora": ("DoRA", "peft_helper.py:67-68"),
    "lora_bias": ("LoRA bias (lora_bias)", "peft_helper.py:69-70"),
    "alora_invocation_tokens": ("Activated LoRA (aLoRA)", "peft_helper.py:80-81"),
    "layer_replication": ("layer_replication", "peft_helper.py:82-83"),
    "use_bdlora": ("block-diagonal LoRA (BD-LoRA)", "peft_helper.py:84-85"),
    "use_qalora": ("QALoRA", "peft_helper.py:86-87"),
}
LORA_SUFFIXES = {"lora_A.weight": True, "lora_B.weight": False, "lora_embedding_A": True, "lora_embedding_B": False}
PREFIX = "base_model.model."


@dataclass(frozen=True)
class VllmExport:
    """What `export_vllm` wrote: the folder, its largest rank and the `--max-lora-rank` vLLM needs for it."""

    path: Path
    max_rank: int
    max_lora_rank: int


def _refusal(what: str, source: str, advice: str = "") -> str:
    return f"vLLM {VLLM_RELEASE} refuses {what} ({source})" + (f"; {advice}" if advice else "")


def max_lora_rank_for(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`; VllmIncompatibleError above 512."""
    for allowed in MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VllmIncompatibleError(_refusal(
        f"rank {rank}: --max-lora-rank is at most {MAX_LORA_RANKS[-1]}", "vllm/config/lora.py:26, "
        "peft_helper.py:200-204", f"`lorakit squeeze --r {MAX_LORA_RANKS[-1]}` (or lower) first"))


# ---- the adapter on its model, before anything is written ----------------------------------------------------
def adapter_problems(model: torch.nn.Module, name: str = "default") -> list[str]:
    """Why adapter `name` cannot become a folder vLLM loads (empty when it can), one message per module."""
    problems = []
    if get_config(model, name).use_dora or any(_is_dora(w, name) for _, w in wrappers(model)):
        problems.append(_refusal(
            "DoRA (use_dora): its magnitude vector rescales W + ΔW column by column, a full-rank change no LoRA "
            "reproduces", "vllm/lora/peft_helper.py:67-68",
            "`lorakit squeeze` writes its best low-rank plain LoRA, `lorakit merge` folds it into the base (serve "
            "that model without --enable-lora)"))
    heads = []
    for path, w in wrappers(model):
        if isinstance(w, TrainedCopy) and name in w.copies:
            heads.append(path)
            problems.extend(_head_problems(path, w.copies[name]))
        elif isinstance(w, AdaptedLayer) and name in w.adapters and not _is_dora(w, name):
            problems.extend(_layer_problems(path, w, name))
    if len(heads) > 1:
        problems.append(_refusal(f"more than one full module ({heads})", "vllm/lora/lora_model.py:188-192"))
    return problems


def _is_dora(layer, name: str) -> bool:
    return isinstance(layer, AdaptedLayer) and name in layer.adapters and layer.adapters[name].name == "dora"


def _layer_problems(path: str, layer: AdaptedLayer, name: str) -> list[str]:
    variant = layer.adapters[name]
    if type(layer.kind) not in (LinearKind, QuantLinearKind, EmbeddingKind):
        return [_refusal(f"an adapter on {path} ({type(layer.kind).__name__}): it wraps only linear layers and the "
                         f"model's embedding modules", "vllm/lora/utils.py:248-298, lora_model.py:250-286")]
    if variant.factors() is None:
        return [_refusal(f"{path}: {variant.name} has no exact low-rank form, and vLLM loads only lora_A/lora_B "
                         f"pairs", "vllm/lora/utils.py:223-236", "`lorakit squeeze` writes its best low-rank LoRA")]
    return []


def _head_problems(path: str, copy: torch.nn.Module) -> list[str]:
    leaf = path.rsplit(".", 1)[-1]
    if leaf not in HEAD_MODULES:
        return [_refusal(f"modules_to_save {leaf!r} ({path}): only None or {list(HEAD_MODULES)} (a classification "
                         f"head)", "vllm/lora/peft_helper.py:57-66",
                         "target it with LoRA instead, or `lorakit merge` the adapter into the base")]
    extra = sorted(set(copy.state_dict()) - {"weight", "bias"})
    if extra:
        return [_refusal(f"tensors {extra} of head {path}: a head is one weight (and bias)",
                         "vllm/lora/utils.py:223-229, lora_model.py:178-187")]
    return []


def export_vllm(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> VllmExport:
    """Write adapter `name` as a PEFT LoRA folder that vLLM's LoRA loader accepts (see the module's rules).

    Refuses (VllmIncompatibleError, nothing written) what has no exact vLLM form, then writes with `export_lora`
    (scales folded into lora_B) and checks the written folder with `check_vllm_folder`.
    """
    problems = adapter_problems(model, name)
    if problems:
        raise VllmIncompatibleError("; ".join(problems))
    path = export_lora(model, directory, name)
    max_rank = check_vllm_folder(path)
    return VllmExport(Path(path), max_rank, max_lora_rank_for(max_rank))


# ---- the written folder, as vLLM reads it ----------------------------------------------------------------------
def check_vllm_folder(directory: str | os.PathLike) -> int:
    """Check an adapter folder against vLLM's loader rules; return its largest rank.

    Raises VllmIncompatibleError listing every broken rule with its source.
    """
    config, tensors = _read(Path(directory))
    problems = _config_problems(config)
    if not problems:
        problems = _tensor_problems(config, tensors)
    if problems:
        raise VllmIncompatibleError(f"{directory}: " + "; ".join(problems))
    return max([config["r"], *config.get("rank_pattern", {}).values()])


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        with safe_open(directory / WEIGHTS_NAME, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, SafetensorError) as e:
        raise VllmIncompatibleError(f"{directory}: vLLM reads {CONFIG_NAME} and {WEIGHTS_NAME} "
                                    f"(vllm/lora/lora_model.py:243-323): {e}") from None
    return config, tensors


def _config_problems(config: dict) -> list[str]:
    problems = [_refusal(f"a config without {key!r}", "peft_helper.py:162-176")
                for key in ("r", "lora_alpha", "target_modules") if key not in config]
    problems += [_refusal(what, source) for key, (what, source) in REFUSED_FLAGS.items() if config.get(key)]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        problems.append(_refusal(f"init_lora_weights={init!r} (it changes the base weights)",
                                 "peft_helper.py:71-79,90-101", "export it through lorakit (the change is folded)"))
    if config.get("bias", "none") != "none":
        problems.append(_refusal(f"bias={config['bias']!r}: adapter bias", "peft_helper.py:206-207"))
    heads = [m for m in config.get("modules_to_save") or [] if m not in HEAD_MODULES]
    if heads:
        problems.append(_refusal(f"modules_to_save {heads}", "peft_helper.py:57-66"))
    ranks = {"r": config.get("r", 1), **{f"rank_pattern[{k!r}]": v for k, v in config.get("rank_pattern", {}).items()}}
    for where, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            problems.append(_refusal(f"{where} = {rank!r}, not a positive integer", "peft_helper.py:104-113"))
    if not problems and max(ranks.values()) > MAX_LORA_RANKS[-1]:
        problems.append(_refusal(f"rank {max(ranks.values())} above the largest --max-lora-rank "
                                 f"{MAX_LORA_RANKS[-1]}", "vllm/config/lora.py:26, peft_helper.py:200-204"))
    return problems


def parse_lora_name(key: str) -> tuple[str, bool | None]:
    """(module name, is lora_A) as vLLM parses a tensor name; (head name, None) for a head's weight/bias.

    VllmIncompatibleError for any other name (vllm/lora/utils.py:183-236).
    """
    name = key.removeprefix(PREFIX)
    for suffix, is_a in LORA_SUFFIXES.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], is_a
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in HEAD_MODULES:
        return parts[-2], None
    raise VllmIncompatibleError(_refusal(f"tensor {key!r}: unsupported LoRA weight", "vllm/lora/utils.py:183-236"))


def resolve_rank_and_scaling(config: dict, module: str) -> tuple[int, float]:
    """The rank and scale vLLM (and PEFT) give `module`: rank_pattern / alpha_pattern keys match as
    `(.*\\.)?(key)$`, first match wins; α/r, or α/√r with use_rslora (peft_helper.py:124-160)."""
    def match(pattern: dict):
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), None)
    rank, alpha = match(config.get("rank_pattern") or {}), match(config.get("alpha_pattern") or {})
    rank, alpha = config["r"] if rank is None else rank, config["lora_alpha"] if alpha is None else alpha
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _tensor_problems(config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    problems, pairs, heads = [], {}, {}
    heads_allowed = set(config.get("modules_to_save") or [])
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):
        heads_allowed |= set(HEAD_MODULES)
    for key, t in tensors.items():
        try:
            module, is_a = parse_lora_name(key)
        except VllmIncompatibleError as e:
            problems.append(str(e))
            continue
        if not t.is_floating_point():
            problems.append(_refusal(f"tensor {key!r} of dtype {t.dtype}: vLLM casts to the model's float dtype",
                                     "vllm/lora/lora_model.py:169,173"))
        if is_a is None:
            if module not in heads_allowed:
                problems.append(_refusal(f"tensor {key!r}: {module!r} is not in modules_to_save",
                                         "vllm/lora/utils.py:227-229, lora_model.py:146-150"))
            heads.setdefault(module, set()).add(key.rsplit(".", 1)[-1])
        else:
            pairs.setdefault(module, {})["A" if is_a else "B"] = (key, t)
    problems += _pair_problems(config, pairs)
    if len(heads) > 1:
        problems.append(_refusal(f"more than one full module ({sorted(heads)})", "lora_model.py:188-192"))
    problems += [_refusal(f"head {m!r} without a weight", "lora_model.py:180-182")
                 for m, names in heads.items() if "weight" not in names]
    return problems


def _pair_problems(config: dict, pairs: dict) -> list[str]:
    problems = []
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: lora_A without lora_B or the reverse (vLLM needs both)")
            continue
        (key_a, a), (_, b) = pair["A"], pair["B"]
        rank_a, rank_b = a.shape[0], b.shape[-1]
        rank, _ = resolve_rank_and_scaling(config, module)
        if not rank_a == rank_b == rank:
            problems.append(_refusal(f"{module}: tensors of rank {rank_a}/{rank_b} where rank_pattern gives {rank} "
                                     f"(the scale would be wrong)", "peft_helper.py:138-160"))
    return problems
