"""Bad input (issue 2 §8): every malformed adapter folder, config, name or request raises its typed
`lorakit.errors` exception, and a failed load leaves the model exactly as it was.

Valid adapter folders are written with `lorakit.save_adapter` (non-trivial: B ≠ 0, DoRA magnitudes
perturbed), copied, and corrupted one way per case. Each case runs on a bare model and on a model
that already holds a (trainable) adapter, for a toy module and a tiny LlamaForCausalLM.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import errors as E
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.layers import AdaptedLayer
from lorakit.variants import variant_names
from lorakit.variants.lora import LoRA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PREFIX = "base_model.model."


# ---- models ------------------------------------------------------------------------------------
class Toy(nn.Module):
    """Embedding → Linear → LayerNorm (not adaptable) → Conv1d → Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids):
        h = self.norm(self.lin(self.emb(input_ids)))
        return self.head(self.conv(h.transpose(1, 2)).transpose(1, 2))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


@dataclass(frozen=True)
class Spec:
    """A base model and the adapters used on it."""

    build: Callable[[], nn.Module]
    lora: dict  # the LoRA folder's config (with an embedding target and modules_to_save)
    dora: dict  # the DoRA folder's config
    first: dict  # the adapter a model already holds in the "adapter" state (overlapping targets)
    unsupported: str  # a module that cannot be adapted


SPECS = {
    "toy": Spec(Toy, dict(target_modules=["emb", "lin", "conv"], modules_to_save=["head"]),
                dict(target_modules=["lin", "conv", "emb"]),
                dict(r=2, target_modules=["lin", "conv"], modules_to_save=["head"]), "norm"),
    "llama": Spec(tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]),
                  dict(target_modules=["k_proj", "o_proj", "down_proj"]),
                  dict(r=2, target_modules=["q_proj", "o_proj"]), "input_layernorm"),
}
STATES = ("bare", "adapter")


def make_model(kind: str, state: str) -> nn.Module:
    """A seeded base model; in state "adapter" it already holds trainable adapter "first"."""
    torch.manual_seed(0)
    model = SPECS[kind].build().eval()
    if state == "adapter":
        lorakit.inject(model, lorakit.AdapterConfig(init_lora_weights=False, **SPECS[kind].first), name="first")
    return model


def inputs(kind: str) -> torch.Tensor:
    return torch.arange(12).remainder(11 if kind == "toy" else 64).view(2, 6)


def output(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs(kind))
    return out if torch.is_tensor(out) else out.logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind → {"lora": folder, "dora": folder}, each a valid, non-trivial adapter saved by lorakit."""
    made = {}

    def get(kind: str) -> dict[str, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(f"valid_{kind}")
            made[kind] = {}
            for source in ("lora", "dora"):
                model = make_model(kind, "bare")
                config = lorakit.AdapterConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                               use_dora=source == "dora", **getattr(SPECS[kind], source))
                lorakit.inject(model, config)
                with torch.no_grad():
                    for key, t in lorakit.adapter_parameters(model, "default").items():
                        if key.endswith("lora_magnitude_vector"):
                            t.mul_(1 + 0.2 * torch.randn_like(t))
                made[kind][source] = lorakit.save_adapter(model, root / source)
        return made[kind]

    return get


# ---- the snapshot ------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must not change, as plain comparable values.

    Parameters and buffers (name, object identity, dtype, shape, requires_grad, exact bytes), every
    named module (identity, type, training flag, and a wrapper's active/merged/disabled/routing
    state), the adapter names with their configs, and the active adapters.
    """
    def wrapper_state(m):
        if not hasattr(m, "routing"):
            return None
        return (tuple(getattr(m, "active", ())), tuple(getattr(m, "merged", None) or ()),
                getattr(m, "disabled", None), m.routing is None)

    names = lorakit.adapter_names(model)
    return {
        "parameters": [(n, id(p), p.dtype, tuple(p.shape), p.requires_grad, _bytes(p))
                       for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, id(b), b.dtype, tuple(b.shape), _bytes(b))
                    for n, b in model.named_buffers(remove_duplicate=False)],
        "modules": [(n, id(m), type(m), m.training, wrapper_state(m))
                    for n, m in model.named_modules(remove_duplicate=False)],
        "adapters": names,
        "configs": {n: lorakit.get_config(model, n) for n in names},
        "active": lorakit.active_adapters(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for field, old in before.items():
        new = after[field]
        if field in ("parameters", "buffers", "modules"):
            changed = sorted({x[0] for x in set(old) ^ set(new)})
            assert old == new, f"{field} changed: {changed[:8]}"
        else:
            assert old == new, f"{field} changed: {old!r} -> {new!r}"


# ---- folder corruptions ------------------------------------------------------------------------
def _weights(folder: Path) -> Path:
    return folder / WEIGHTS_NAME


def raw_edit(fn):
    """Rewrite the safetensors file's bytes: fn(bytes, header_length) -> bytes."""
    def corrupt(folder, ctx):
        raw = _weights(folder).read_bytes()
        _weights(folder).write_bytes(fn(raw, struct.unpack("<Q", raw[:8])[0]))
    return corrupt


def flip(offset_fn):
    def edit(raw, n):
        b = bytearray(raw)
        b[offset_fn(n)] ^= 0xFF
        return bytes(b)
    return raw_edit(edit)


def tensors_edit(fn):
    """Rewrite the tensors with safetensors: fn(dict of prefixed keys → tensors) mutates the dict."""
    def corrupt(folder, ctx):
        tensors = load_file(_weights(folder))
        fn(tensors)
        save_file(tensors, _weights(folder), metadata={"format": "pt"})
    return corrupt


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def set_tensor(suffix, fn):
    def edit(tensors):
        k = first_key(tensors, suffix)
        tensors[k] = fn(tensors[k].clone())
    return tensors_edit(edit)


def put(index, value, dtype=None):
    """Set one element (in fp32), then convert to `dtype` if given."""
    def fn(t):
        t = t.float()
        t.view(-1)[index] = value
        return t if dtype is None else t.to(dtype)
    return fn


def drop(suffix):
    return tensors_edit(lambda d: d.pop(first_key(d, suffix)))


def add(key, like_suffix):
    return tensors_edit(lambda d: d.__setitem__(PREFIX + key, d[first_key(d, like_suffix)].clone()))


def unprefix_one(tensors):
    k = sorted(tensors)[0]
    tensors[k[len(PREFIX):]] = tensors.pop(k)


def config_edit(fn):
    """Edit the parsed adapter_config.json: fn(dict, ctx) mutates it."""
    def corrupt(folder, ctx):
        data = json.loads((folder / CONFIG_NAME).read_text())
        fn(data, ctx)
        (folder / CONFIG_NAME).write_text(json.dumps(data))
    return corrupt


def cfg(**updates):
    return config_edit(lambda d, ctx: d.update(updates))


def own_cfg(**updates):
    """A config without `peft_type` (lorakit's own dict form), with updates."""
    return config_edit(lambda d, ctx: (d.pop("peft_type"), d.update(updates)))


def write(filename, content):
    def corrupt(folder, ctx):
        path = folder / filename
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return corrupt


def remove(filename):
    return lambda folder, ctx: (folder / filename).unlink()


def as_directory(filename):
    def corrupt(folder, ctx):
        (folder / filename).unlink()
        (folder / filename).mkdir()
    return corrupt


def halve_config(folder, ctx):
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[:len(text) // 2])


class Trap:
    """Unpickling this creates `path` (it must never happen)."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.write_text, (self.path, "unpickled")


def pickle_only(folder, ctx):
    _weights(folder).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": Trap(ctx["marker"])}))


def pickle_beside_corrupt_safetensors(folder, ctx):
    pickle_only(folder, ctx)
    _weights(folder).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # header says 8 bytes, holds 2


def unsupported_target(data, ctx):
    data["target_modules"] = data["target_modules"] + [ctx["unsupported"]]


class ProbeVariant(LoRA):
    """A second registered variant, to test `use_dora` with a variant other than LoRA/DoRA."""

    name = "badinput_probe"
    peft_type = "BADINPUT_PROBE"


@dataclass(frozen=True)
class Case:
    id: str
    source: str  # "lora" or "dora" folder to start from
    corrupt: Callable
    error: type
    match: tuple = ()  # substrings the message must contain ("{unsupported}" is filled in per model)
    name: str = "default"
    states: tuple = STATES
    kinds: tuple = tuple(SPECS)


NAN, INF = float("nan"), float("inf")
TRUNCATION = [
    Case("truncated_half", "lora", raw_edit(lambda raw, n: raw[:len(raw) // 2]), E.CorruptFileError),
    Case("truncated_last_byte", "lora", raw_edit(lambda raw, n: raw[:-1]), E.CorruptFileError),
    Case("truncated_in_length", "lora", raw_edit(lambda raw, n: raw[:4]), E.CorruptFileError),
    Case("empty_weights", "lora", write(WEIGHTS_NAME, b""), E.CorruptFileError),
    Case("trailing_bytes", "lora", raw_edit(lambda raw, n: raw + b"\0" * 16), E.CorruptFileError),
    Case("header_length_huge", "lora", raw_edit(lambda raw, n: struct.pack("<Q", 2**60) + raw[8:]),
         E.CorruptFileError),
    Case("header_length_zero", "lora", raw_edit(lambda raw, n: struct.pack("<Q", 0) + raw[8:]), E.CorruptFileError),
    Case("header_first_byte_flipped", "lora", flip(lambda n: 8), E.CorruptFileError),
    Case("header_middle_byte_flipped", "lora", flip(lambda n: 8 + n // 2), E.CorruptFileError),
    Case("header_unknown_dtype", "lora", raw_edit(lambda raw, n: raw.replace(b'"F32"', b'"XYZ"', 1)),
         E.CorruptFileError),
    Case("header_shape_digit", "dora", raw_edit(lambda raw, n: raw.replace(b'"shape":[4', b'"shape":[5', 1)),
         E.CorruptFileError),
    Case("weights_are_json", "lora", write(WEIGHTS_NAME, '{"not": "safetensors"}'), E.CorruptFileError),
    Case("weights_is_directory", "lora", as_directory(WEIGHTS_NAME), E.CorruptFileError),
]
JSON = [
    Case("json_truncated", "lora", halve_config, E.CorruptFileError, (CONFIG_NAME,)),
    Case("json_empty", "lora", write(CONFIG_NAME, ""), E.CorruptFileError),
    Case("json_trailing_comma", "lora", write(CONFIG_NAME, '{"r": 4,}'), E.CorruptFileError),
    Case("json_invalid_utf8", "lora", write(CONFIG_NAME, b'\xff\xfe{"r": 4}'), E.CorruptFileError),
    Case("json_list", "lora", write(CONFIG_NAME, "[1, 2]"), E.CorruptFileError, ("list",)),
    Case("json_string", "lora", write(CONFIG_NAME, '"adapter"'), E.CorruptFileError, ("str",)),
    Case("json_null", "lora", write(CONFIG_NAME, "null"), E.CorruptFileError),
    Case("json_number", "lora", write(CONFIG_NAME, "4"), E.CorruptFileError),
    Case("config_is_directory", "lora", as_directory(CONFIG_NAME), E.CorruptFileError),
]
MISSING = [
    Case("config_missing", "lora", remove(CONFIG_NAME), E.CorruptFileError, (CONFIG_NAME,)),
    Case("weights_missing", "lora", remove(WEIGHTS_NAME), E.CorruptFileError, (WEIGHTS_NAME,)),
    Case("folder_missing", "lora", lambda folder, ctx: shutil.rmtree(folder), E.CorruptFileError),
    Case("pickle_only", "lora", pickle_only, E.PickleRefusedError, ("adapter_model.bin",)),
    Case("pickle_beside_corrupt_safetensors", "lora", pickle_beside_corrupt_safetensors, E.CorruptFileError),
]
KEYS = [
    Case("missing_lora_B", "lora", drop("lora_B.weight"), E.StateDictError, ("lora_B.weight",)),
    Case("missing_embedding_A", "lora", drop("lora_embedding_A"), E.StateDictError, ("lora_embedding_A",)),
    Case("missing_saved_module_tensor", "lora", drop("head.weight"), E.StateDictError, ("head.weight",)),
    Case("missing_magnitude", "dora", drop("lora_magnitude_vector"), E.StateDictError, ("lora_magnitude_vector",)),
    Case("no_tensors", "lora", tensors_edit(dict.clear), E.StateDictError),
    Case("extra_key_unknown_suffix", "lora", add("lora_C.weight", "lora_A.weight"), E.StateDictError, ("lora_C",)),
    Case("extra_key_unknown_module", "lora", add("ghost.lora_A.weight", "lora_A.weight"), E.StateDictError,
         ("ghost",)),
    Case("dora_file_lora_config", "dora", cfg(use_dora=False), E.StateDictError, ("lora_magnitude_vector",)),
    Case("lora_file_dora_config", "lora", cfg(use_dora=True), E.StateDictError, ("lora_magnitude_vector",)),
    Case("saved_module_not_in_config", "lora", cfg(modules_to_save=None), E.StateDictError),
    Case("mixed_prefixes", "lora", tensors_edit(unprefix_one), E.StateDictError, (PREFIX,)),
]
SHAPES = [
    Case("A_transposed", "lora", set_tensor("lora_A.weight", lambda t: t.transpose(0, 1).contiguous()),
         E.StateDictError, ("lora_A.weight",)),
    Case("B_extra_dim", "lora", set_tensor("lora_B.weight", lambda t: t.unsqueeze(0)), E.StateDictError),
    Case("A_flattened", "dora", set_tensor("lora_A.weight", lambda t: t.reshape(-1)), E.StateDictError),
    Case("embedding_B_transposed", "lora", set_tensor("lora_embedding_B", lambda t: t.T.contiguous()),
         E.StateDictError, ("lora_embedding_B",)),
    Case("magnitude_extra_rows", "dora", set_tensor("lora_magnitude_vector", lambda t: torch.cat([t, t])),
         E.StateDictError),
    Case("config_rank_smaller", "lora", cfg(r=2), E.StateDictError, ("r=2",)),
    Case("config_rank_larger", "dora", cfg(r=8), E.StateDictError),
    Case("rank_pattern_disagrees", "lora", config_edit(lambda d, ctx: d.update(
        rank_pattern={d["target_modules"][1]: 2})), E.StateDictError),
    Case("saved_module_wrong_shape", "lora", set_tensor("head.weight", lambda t: t[:-1].clone()), E.StateDictError),
]
VALUES = [
    Case("nan_in_A", "lora", set_tensor("lora_A.weight", put(1, NAN)), E.StateDictError, ("lora_A.weight",)),
    Case("inf_in_B", "lora", set_tensor("lora_B.weight", put(0, INF)), E.StateDictError, ("non-finite",)),
    Case("neg_inf_in_embedding_B", "lora", set_tensor("lora_embedding_B", put(3, -INF)), E.StateDictError),
    Case("neg_inf_in_magnitude", "dora", set_tensor("lora_magnitude_vector", put(2, -INF)), E.StateDictError,
         ("lora_magnitude_vector",)),
    Case("nan_in_saved_module", "lora", set_tensor("head.weight", put(0, NAN)), E.StateDictError),
    Case("nan_in_bf16_tensor", "lora", set_tensor("lora_B.weight", put(0, NAN, torch.bfloat16)), E.StateDictError),
    Case("nan_in_fp64_tensor", "dora", set_tensor("lora_A.weight", put(0, NAN, torch.float64)), E.StateDictError),
    Case("nan_in_fp8_tensor", "lora", set_tensor("lora_A.weight", put(0, NAN, torch.float8_e4m3fn)),
         E.StateDictError),
    Case("int32_tensor", "lora", set_tensor("lora_A.weight", lambda t: t.to(torch.int32)), E.StateDictError,
         ("int32",)),
    Case("int64_tensor", "dora", set_tensor("lora_B.weight", lambda t: t.to(torch.int64)), E.StateDictError),
    Case("bool_tensor", "dora", set_tensor("lora_magnitude_vector", lambda t: t > 0), E.StateDictError),
    Case("uint8_tensor", "lora", set_tensor("lora_embedding_A", lambda t: t.to(torch.uint8)), E.StateDictError),
    Case("dtype_renamed_in_header", "lora", raw_edit(lambda raw, n: raw.replace(b'"F32"', b'"I32"', 1)),
         E.StateDictError),
]
VARIANTS = [
    Case("unknown_peft_type", "lora", cfg(peft_type="NOT_A_TUNER"), E.UnknownVariantError, ("NOT_A_TUNER",)),
    Case("peft_type_not_a_string", "lora", cfg(peft_type=7), E.UnknownVariantError),
    Case("lora_peft_type_unknown_variant", "lora", cfg(variant="nope"), E.UnknownVariantError, ("nope",)),
    Case("unknown_variant_no_peft_type", "lora", own_cfg(variant="nope"), E.UnknownVariantError, ("nope",)),
    Case("use_dora_with_probe_variant", "lora", cfg(peft_type=ProbeVariant.peft_type, variant=ProbeVariant.name,
                                                    use_dora=True), E.ConfigError, ("use_dora",)),
    Case("use_dora_with_unknown_variant", "lora", own_cfg(variant="nope", use_dora=True), E.ConfigError,
         ("use_dora",)),
]
FEATURES = {  # PEFT options we do not implement, each set to a non-default value
    "lora_bias": True, "target_parameters": ["lin.weight"], "layer_replication": [[0, 1]],
    "alora_invocation_tokens": [3, 4], "use_qalora": True, "trainable_token_indices": [1, 2],
    "eva_config": {"rho": 2.0}, "loftq_config": {"loftq_bits": 4}, "corda_config": {"corda_method": "kpm"},
    "ensure_weight_tying": True, "megatron_config": {"tp": 2}, "use_bdlora": {"block": 2},
    "arrow_config": {"top_k": 3}, "lora_ga_config": {"direction": "ArB2r"}, "kasa_config": {"k": 1},
    "monteclora_config": {"n": 2}, "velora_config": {"rank": 2},
}
FEATURE_CASES = [Case(f"feature_{k}", "lora", cfg(**{k: v}), E.UnsupportedFeatureError, (k,))
                 for k, v in FEATURES.items()]
CONFIG_VALUES = [
    Case("unknown_config_key", "lora", cfg(lora_frobnicate=1), E.ConfigError,
         ("lora_frobnicate", "lora_alpha", "target_modules")),
    Case("r_zero", "lora", cfg(r=0), E.ConfigError, ("r must",)),
    Case("r_negative", "lora", cfg(r=-4), E.ConfigError),
    Case("r_string", "lora", cfg(r="4"), E.ConfigError),
    Case("r_float", "lora", cfg(r=4.5), E.ConfigError),
    Case("r_bool", "lora", cfg(r=True), E.ConfigError),
    Case("rank_pattern_zero", "lora", config_edit(lambda d, ctx: d.update(rank_pattern={d["target_modules"][0]: 0})),
         E.ConfigError),
    Case("rank_pattern_not_a_dict", "lora", cfg(rank_pattern=[4]), E.ConfigError, ("rank_pattern",)),
    Case("dropout_one", "lora", cfg(lora_dropout=1.0), E.ConfigError, ("lora_dropout",)),
    Case("dropout_negative", "lora", cfg(lora_dropout=-0.1), E.ConfigError, ("lora_dropout",)),
    Case("dropout_string", "lora", cfg(lora_dropout="0.1"), E.ConfigError, ("lora_dropout",)),
    Case("alpha_string", "lora", cfg(lora_alpha="8"), E.ConfigError, ("lora_alpha",)),
    Case("alpha_nan", "lora", write(CONFIG_NAME, '{"r": 4, "lora_alpha": NaN, "target_modules": ["lin"]}'),
         E.ConfigError, ("lora_alpha",)),
    Case("alpha_pattern_infinite", "dora", config_edit(lambda d, ctx: d.update(
        alpha_pattern={d["target_modules"][0]: INF})), E.ConfigError, ("alpha_pattern",)),
    Case("use_rslora_string", "lora", cfg(use_rslora="yes"), E.ConfigError, ("use_rslora",)),
    Case("bias_all", "lora", cfg(bias="all"), E.UnsupportedFeatureError, ("bias",)),
    Case("bias_lora_only", "lora", cfg(bias="lora_only"), E.UnsupportedFeatureError, ("bias",)),
    Case("init_unknown", "lora", cfg(init_lora_weights="pissa_niter_4"), E.ConfigError, ("init_lora_weights",)),
    Case("target_modules_number", "lora", cfg(target_modules=5), E.ConfigError, ("target_modules",)),
    Case("target_modules_list_of_numbers", "lora", cfg(target_modules=[1, 2]), E.ConfigError, ("target_modules",)),
    Case("layers_to_transform_string", "dora", cfg(layers_to_transform="0"), E.ConfigError,
         ("layers_to_transform",)),
    Case("modules_to_save_number", "lora", cfg(modules_to_save=3), E.ConfigError, ("modules_to_save",)),
]
TARGETS = [
    Case("target_matches_nothing", "lora", cfg(target_modules=["nope_proj", "zz"]), E.TargetError,
         ("nope_proj", "zz")),
    Case("regex_matches_nothing", "dora", cfg(target_modules=r".*\.nothing_here"), E.TargetError,
         ("nothing_here",)),
    Case("everything_excluded", "lora", config_edit(lambda d, ctx: d.update(exclude_modules=d["target_modules"])),
         E.TargetError),
    Case("layer_not_in_model", "dora", cfg(layers_to_transform=[7]), E.TargetError, kinds=("llama",)),
    Case("unsupported_module_type", "lora", config_edit(unsupported_target), E.TargetError,
         ("cannot be adapted", "{unsupported}")),
    Case("modules_to_save_missing", "lora", cfg(modules_to_save=["no_such_head"]), E.TargetError,
         ("no_such_head",)),
]
NAMES = [Case(f"name_{label}", "lora", lambda folder, ctx: None, E.AdapterNameError, name=name)
         for label, name in [("empty", ""), ("slash", "a/b"), ("backslash", "a\\b"), ("dotdot", ".."),
                             ("dotdot_inside", "x..y"), ("dot", "."), ("dotted", "a.b"), ("base", "__base__"),
                             ("padded", " x "), ("traversal", "../evil")]]
NAMES.append(Case("name_exists", "lora", lambda folder, ctx: None, E.StateDictError, ("first", "in place"),
                  name="first", states=("adapter",)))  # a hot swap whose tensors do not fit the loaded adapter
CASES = (TRUNCATION + JSON + MISSING + KEYS + SHAPES + VALUES + VARIANTS + FEATURE_CASES + CONFIG_VALUES + TARGETS
         + NAMES)
assert len({c.id for c in CASES}) == len(CASES)
PARAMS = [pytest.param(case, kind, state, id=f"{case.id}-{kind}-{state}")
          for case in CASES for kind in case.kinds for state in case.states]


@pytest.fixture
def probe_variant(monkeypatch):
    variant_names()  # discover the built-in variants first
    monkeypatch.setitem(lorakit.variants._REGISTRY, ProbeVariant.name, ProbeVariant)


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("source", ["lora", "dora"])
def test_valid_folders_load_and_change_the_model(folders, kind, state, source):
    """Control: the uncorrupted folders load in both states, change outputs, and change the snapshot."""
    model = make_model(kind, state)
    before, out = snapshot(model), output(model, kind)
    lorakit.load_adapter(model, folders(kind)[source], name="loaded")
    lorakit.set_active(model, ["loaded"])
    assert lorakit.adapter_names(model) == (["first"] if state == "adapter" else []) + ["loaded"]
    assert (output(model, kind) - out).abs().max() > 1e-3
    with pytest.raises(AssertionError):
        assert_unchanged(model, before)


def test_snapshot_sees_one_bit_and_requires_grad():
    """The snapshot catches the smallest changes: one ulp in one weight, one requires_grad flag."""
    model = make_model("toy", "adapter")
    before = snapshot(model)
    w = model.norm.weight
    with torch.no_grad():
        w[0] = torch.nextafter(w[0], torch.tensor(INF))
    with pytest.raises(AssertionError, match="norm.weight"):
        assert_unchanged(model, before)
    with torch.no_grad():
        w[0] = torch.nextafter(w[0], torch.tensor(-INF))
    assert_unchanged(model, before)
    w.requires_grad_(not w.requires_grad)
    with pytest.raises(AssertionError):
        assert_unchanged(model, before)


@pytest.mark.parametrize("case,kind,state", PARAMS)
def test_failed_load_leaves_model_unchanged(case, kind, state, folders, tmp_path, probe_variant):
    folder = tmp_path / "adapter"
    shutil.copytree(folders(kind)[case.source], folder)
    ctx = {"unsupported": SPECS[kind].unsupported, "marker": tmp_path / "unpickled.marker"}
    case.corrupt(folder, ctx)
    model = make_model(kind, state)
    before, out = snapshot(model), output(model, kind)
    with pytest.raises(case.error) as info:
        lorakit.load_adapter(model, folder, name=case.name, trainable=True)
    for text in case.match:
        assert text.format(**ctx) in str(info.value)
    assert_unchanged(model, before)
    assert torch.equal(output(model, kind), out)
    assert not ctx["marker"].exists()


# Cases only a model can reject: the folder itself is well formed.
# integer tensors are legal in a file (index tensors of sparse variants); a float slot refuses them at load
MODEL_LEVEL = {c.id for c in KEYS + SHAPES + TARGETS if c.id != "mixed_prefixes"} | {
    "int32_tensor", "int64_tensor", "uint8_tensor", "dtype_renamed_in_header"}


@pytest.mark.parametrize("case", [c for c in CASES if c not in NAMES], ids=lambda c: c.id)
def test_read_adapter_alone(case, folders, tmp_path, probe_variant):
    """`read_adapter` (no model) raises every file-level problem; model-level ones read fine."""
    folder = tmp_path / "adapter"
    shutil.copytree(folders("toy")[case.source], folder)
    case.corrupt(folder, {"unsupported": "norm", "marker": tmp_path / "marker"})
    if case.id in MODEL_LEVEL:
        lorakit.read_adapter(folder)
    else:
        with pytest.raises(case.error):
            lorakit.read_adapter(folder)
    assert not (tmp_path / "marker").exists()


def test_pickle_is_never_unpickled(folders, tmp_path, monkeypatch):
    """A pickle-only folder is refused by name; the trap pickle would create a marker if it were loaded."""
    marker = tmp_path / "unpickled.marker"
    control = tmp_path / "control.marker"
    pickle.loads(pickle.dumps(Trap(control)))
    assert control.exists()  # the trap works

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something tried to unpickle")
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    folder = tmp_path / "adapter"
    shutil.copytree(folders("toy")["lora"], folder)
    pickle_only(folder, {"marker": marker})
    model = make_model("toy", "adapter")
    before = snapshot(model)
    with pytest.raises(E.PickleRefusedError, match="adapter_model.bin"):
        lorakit.load_adapter(model, folder, name="second")
    with pytest.raises(E.PickleRefusedError):
        lorakit.read_adapter(folder)
    assert not marker.exists()
    assert_unchanged(model, before)
    shutil.copy(folders("toy")["lora"] / WEIGHTS_NAME, folder / WEIGHTS_NAME)  # beside a valid file
    lorakit.load_adapter(model, folder, name="second")  # the safetensors file is used, the pickle ignored
    assert "second" in lorakit.adapter_names(model)
    assert not marker.exists()


INJECT_CASES = [
    (dict(target_modules=["nope_proj"]), "default", E.TargetError, "nope_proj"),
    (dict(target_modules=["norm"]), "default", E.TargetError, "norm"),
    (dict(target_modules=["lin"], modules_to_save=["nowhere"]), "default", E.TargetError, "nowhere"),
    (dict(target_modules=["lin"]), "first", E.AdapterNameError, "first"),
    (dict(target_modules=["lin"]), "a/b", E.AdapterNameError, "a/b"),
    (dict(target_modules=["lin"]), "", E.AdapterNameError, ""),
    (dict(target_modules=["lin"]), "__base__", E.AdapterNameError, "__base__"),
    (dict(target_modules=["lin"]), "training", E.AdapterNameError, "torch.nn.Module"),  # a ModuleDict attribute
    (dict(target_modules=["lin"]), "forward", E.AdapterNameError, "torch.nn.Module"),
    (dict(target_modules=None), "default", E.TargetError, "target_modules"),
]


@pytest.mark.parametrize("kwargs,name,error,text", INJECT_CASES)
def test_failed_inject_leaves_model_unchanged(kwargs, name, error, text):
    model = make_model("toy", "adapter")
    before = snapshot(model)
    with pytest.raises(error) as info:
        lorakit.inject(model, lorakit.AdapterConfig(**kwargs), name=name)
    assert text in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs,error,text", [
    (dict(r=0), E.ConfigError, "r"), (dict(r=2.0), E.ConfigError, "r"), (dict(r="8"), E.ConfigError, "r"),
    (dict(lora_dropout=1.0), E.ConfigError, "lora_dropout"), (dict(lora_dropout=-1e-3), E.ConfigError, "lora_dropout"),
    (dict(lora_dropout=None), E.ConfigError, "lora_dropout"), (dict(lora_alpha=INF), E.ConfigError, "lora_alpha"),
    (dict(bias="all"), E.UnsupportedFeatureError, "bias"), (dict(variant="nope"), E.UnknownVariantError, "nope"),
    (dict(use_dora=True, variant="badinput_probe"), E.ConfigError, "use_dora"),
    (dict(rank_pattern={"lin": -1}), E.ConfigError, "rank_pattern"),
])
def test_bad_config_values_in_constructor(kwargs, error, text, probe_variant):
    with pytest.raises(error, match=text):
        lorakit.AdapterConfig(**kwargs)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(E.ConfigError) as info:
        lorakit.AdapterConfig.from_dict({"r": 4, "lora_alhpa": 8})
    assert "lora_alhpa" in str(info.value)
    for valid in lorakit.AdapterConfig.fields():
        assert valid in str(info.value)


@pytest.mark.parametrize("key", sorted(FEATURES))
def test_peft_features_at_defaults_are_accepted(key):
    """The refusal is about values, not keys: PEFT writes every key, at its default for plain LoRA."""
    from lorakit.config import PEFT_UNSUPPORTED_DEFAULTS

    config = lorakit.AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, key: PEFT_UNSUPPORTED_DEFAULTS[key]})
    assert config.variant == "lora" and config.r == 4


# ---- merge and routing -------------------------------------------------------------------------
def _lora_model(kind="toy") -> nn.Module:
    model = make_model(kind, "bare")
    targets = ["emb", "lin", "conv"] if kind == "toy" else ["q_proj", "v_proj", "o_proj"]
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules=targets, init_lora_weights=False))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=targets, init_lora_weights=False,
                                                use_dora=True), name="other")
    return model


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("value", [INF, NAN])
def test_safe_merge_refuses_non_finite(kind, where, value):
    """merge(safe=True) with one non-finite B entry: MergeError, and every weight bit-equal to before."""
    model = _lora_model(kind)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    layer = layers[0 if where == "first" else -1]
    with torch.no_grad():
        layer.adapters["default"].lora_B.view(-1)[0] = value
    before = snapshot(model)
    with pytest.raises(E.MergeError):
        lorakit.merge(model, safe=True)
    assert_unchanged(model, before)
    with pytest.raises(E.MergeError):
        lorakit.merge_and_unload(model, safe=True)
    assert_unchanged(model, before)


def test_safe_merge_refusal_keeps_an_earlier_merge():
    """A refused merge of a second adapter leaves the first one merged, weights bit-equal."""
    model = _lora_model()
    lorakit.merge(model, ["other"], safe=True)
    with torch.no_grad():
        model.conv.adapters["default"].lora_B.view(-1)[5] = -INF
    before = snapshot(model)
    assert all(layer.merged for layer in model.modules() if isinstance(layer, AdaptedLayer))
    with pytest.raises(E.MergeError):
        lorakit.merge(model, ["default"], safe=True)
    assert_unchanged(model, before)


def _routing_clear(model):
    return all(m.routing is None for m in model.modules() if hasattr(m, "routing"))


def test_route_unknown_adapter():
    model = _lora_model()
    before, out = snapshot(model), output(model, "toy")
    with pytest.raises(E.RoutingError, match="ghost"):
        with lorakit.route(model, adapter_names=["default", "ghost"]):
            pytest.fail("entered the routing context")
    assert _routing_clear(model)
    assert_unchanged(model, before)
    assert torch.equal(output(model, "toy"), out)


@pytest.mark.parametrize("names", [["default", "__base__", "other"], ["default"] * 3 + ["other"] * 2, []],
                         ids=["3_names_2_rows", "5_names_2_rows", "no_names"])
def test_route_batch_size_mismatch(names):
    model = _lora_model()
    before, out = snapshot(model), output(model, "toy")
    with pytest.raises(E.RoutingError):
        with lorakit.route(model, adapter_names=names):
            output(model, "toy")  # 2 rows
    assert _routing_clear(model)
    assert_unchanged(model, before)
    assert torch.equal(output(model, "toy"), out)


def test_route_refused_while_merged():
    model = _lora_model()
    lorakit.merge(model, ["default"])
    before = snapshot(model)
    with pytest.raises(E.RoutingError, match="unmerge"):
        with lorakit.route(model, adapter_names=["default", "other"]):
            pytest.fail("entered the routing context")
    assert_unchanged(model, before)
