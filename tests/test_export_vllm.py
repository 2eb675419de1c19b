"""`lorakit export --for vllm` (issue 17 item 6): a folder vLLM v0.34.0's LoRA loader accepts, one test per rule.

vLLM is not installed here, so `vllm_load` below mirrors its loader independently of lorakit's checker:
PEFTHelper.from_dict + validate_legal (vllm/lora/peft_helper.py), parse_fine_tuned_lora_name (vllm/lora/utils.py)
and LoRAModel.from_lora_tensors (vllm/lora/lora_model.py). Outputs are checked against PEFT loading the folder.
"""
import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.io.vllm import VllmIncompatibleError, check_vllm_folder, export_vllm, max_lora_rank_for

from models import ConvNet, llama
from test_cli import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread_module")
IDS = torch.arange(3, 3 + 2 * 7).reshape(2, 7)


# ---- an independent mirror of vLLM v0.34.0's loader ----------------------------------------------------------------
def vllm_load(folder, max_lora_rank=512) -> dict[str, tuple[int, float]]:
    """{module: (rank, scale)} as vLLM would load `folder`; ValueError where vLLM raises."""
    config = json.loads((folder / "adapter_config.json").read_text())
    missing = {"r", "lora_alpha", "target_modules"} - set(config)
    if missing:
        raise ValueError(f"Missing required configuration fields: {missing}")
    errors = []
    heads = config.get("modules_to_save") or []
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [*heads, "classifier", "score"]
    if [m for m in heads if m not in ("classifier", "score")]:
        errors.append("modules_to_save")
    for flag in ("use_dora", "lora_bias", "alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if config.get(flag):
            errors.append(flag)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        errors.append("init_lora_weights")
    ranks = [config["r"], *config.get("rank_pattern", {}).values()]
    if any(not isinstance(r, int) or r <= 0 for r in ranks):
        raise ValueError("rank must be a positive integer")
    if max(ranks) > max_lora_rank:
        errors.append("max_lora_rank")
    if config.get("bias", "none") != "none":
        errors.append("bias")
    if errors:
        raise ValueError(" ".join(errors))
    loaded, full = {}, set()
    for key, tensor in load_file(folder / "adapter_model.safetensors").items():
        parts = key.split(".")
        start = 2 if key.startswith("base_model.model.") else 0
        if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
            module, rank = ".".join(parts[start:-2]), tensor.shape[0] if parts[-2] == "lora_A" else None
        elif parts[-1] in ("weight", "bias") and parts[-2] in ("score", "classifier"):
            module, rank = parts[-2], None
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            module, rank = ".".join(parts[start:-1]), None
        else:
            raise ValueError(f"{key} is unsupported LoRA weight")
        if module in heads:
            full.add(module)
            continue
        r = alpha = None
        for k, v in config.get("rank_pattern", {}).items():
            if r is None and re.match(rf"(.*\.)?({k})$", module):
                r = v
        for k, v in config.get("alpha_pattern", {}).items():
            if alpha is None and re.match(rf"(.*\.)?({k})$", module):
                alpha = v
        r, alpha = r or config["r"], alpha or config["lora_alpha"]
        loaded[module] = (r, alpha / (math.sqrt(r) if config.get("use_rslora") else r))
        assert tensor.is_floating_point()
    if len(full) > 1:
        raise ValueError("Only one full classification module is supported")
    return loaded


# ---- adapters ---------------------------------------------------------------------------------------------------
def adapted(config, base=None, seed=1):
    """`base` (a fresh tiny Llama by default) with `config` injected and every trainable tensor random."""
    model = lorakit.inject(base if base is not None else llama(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_peft_matches(model, folder, base):
    peft = PeftModel.from_pretrained(base, str(folder)).eval()
    assert torch.allclose(logits(peft), logits(model), atol=1e-5)


# ---- what passes ---------------------------------------------------------------------------------------------------
def test_every_scale_is_folded_and_vllm_loads_what_peft_loads(tmp_path):
    config = lorakit.AdapterConfig(r=4, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 8},
                                   alpha_pattern={"v_proj": 3.0},
                                   target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"])
    model = adapted(config)
    result = export_vllm(model, tmp_path / "v")
    assert (result.max_rank, result.max_lora_rank) == (8, 8)
    saved = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is False and saved["lora_alpha"] == saved["r"] == 4 and saved["bias"] == "none"
    assert saved["alpha_pattern"] == {p: float(r) for p, r in saved["rank_pattern"].items()}
    loaded = vllm_load(tmp_path / "v", max_lora_rank=result.max_lora_rank)
    assert all(scale == 1.0 for _, scale in loaded.values())  # every scale sits in lora_B
    assert {m for m in loaded if m.endswith("down_proj")} and all(loaded[m][0] == 8 for m in loaded
                                                                   if m.endswith("down_proj"))
    tensors = load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)  # the whole vocab
    assert tensors["base_model.model.lm_head.lora_A.weight"].shape == (4, 64)
    assert_peft_matches(model, tmp_path / "v", llama())


@pytest.mark.parametrize("config", [dict(r=4, variant="vera"), dict(r=4, init_lora_weights="pissa")],
                         ids=["vera", "pissa"])
def test_low_rank_variants_and_base_changing_inits_export_exactly(config, tmp_path):
    model = adapted(lorakit.AdapterConfig(target_modules=["q_proj", "o_proj"], **config))
    export_vllm(model, tmp_path / "v")
    saved = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["peft_type"] == "LORA"  # PiSSA's base change folded in
    vllm_load(tmp_path / "v")
    assert_peft_matches(model, tmp_path / "v", llama())  # on the original base


def test_a_classification_head_is_the_one_full_module_vllm_takes(tmp_path):
    from transformers import LlamaForSequenceClassification

    config = llama().config
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(config).eval()
    fresh = LlamaForSequenceClassification(config).eval()
    fresh.load_state_dict(base.state_dict())
    model = adapted(lorakit.AdapterConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"],
                                          task_type="SEQ_CLS"), base=base)
    export_vllm(model, tmp_path / "v")
    assert "base_model.model.score.weight" in load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert all(not m.startswith("score") for m in vllm_load(tmp_path / "v"))
    assert_peft_matches(model, tmp_path / "v", fresh)


@pytest.mark.parametrize("rank,allowed", [(1, 1), (2, 8), (8, 8), (17, 32), (300, 320), (512, 512)])
def test_max_lora_rank_is_the_smallest_allowed_value(rank, allowed):
    assert max_lora_rank_for(rank) == allowed


# ---- what is refused, with the rule ------------------------------------------------------------------------------
def test_dora_is_refused_with_the_rule_and_nothing_is_written(tmp_path):
    model = adapted(lorakit.AdapterConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(VllmIncompatibleError, match=r"DoRA .*peft_helper.py:67-68.*squeeze.*merge"):
        export_vllm(model, tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_a_trained_copy_other_than_a_head_is_refused(tmp_path):
    model = adapted(lorakit.AdapterConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(VllmIncompatibleError, match=r"modules_to_save 'lm_head'.*peft_helper.py:57-66"):
        export_vllm(model, tmp_path / "v")


def test_a_conv_layer_is_refused(tmp_path):
    model = lorakit.inject(ConvNet(), lorakit.AdapterConfig(r=2, target_modules=["conv", "head"]))
    with pytest.raises(VllmIncompatibleError, match=r"conv \(ConvKind\).*utils.py:248-298"):
        export_vllm(model, tmp_path / "v")


def test_a_rank_above_512_is_refused():
    with pytest.raises(VllmIncompatibleError, match=r"rank 600.*config/lora.py:26.*squeeze --r 512"):
        max_lora_rank_for(600)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v != "<drop>"}))


def _add_tensor(folder, key, tensor):
    path = folder / "adapter_model.safetensors"
    save_file({**load_file(path), key: tensor}, path)


BROKEN = {  # rule -> (how to break an exported folder, the source its refusal cites)
    "dora": (lambda f: _edit_config(f, use_dora=True), "peft_helper.py:67-68"),
    "lora_bias": (lambda f: _edit_config(f, lora_bias=True), "peft_helper.py:69-70"),
    "bias": (lambda f: _edit_config(f, bias="all"), "peft_helper.py:206-207"),
    "pissa_init": (lambda f: _edit_config(f, init_lora_weights="pissa"), "peft_helper.py:71-79"),
    "alora": (lambda f: _edit_config(f, alora_invocation_tokens=[5]), "peft_helper.py:80-81"),
    "layer_replication": (lambda f: _edit_config(f, layer_replication=[[0, 2]]), "peft_helper.py:82-83"),
    "qalora": (lambda f: _edit_config(f, use_qalora=True), "peft_helper.py:86-87"),
    "rank_pattern": (lambda f: _edit_config(f, rank_pattern={"q_proj": 0}), "peft_helper.py:104-113"),
    "rank_512": (lambda f: _edit_config(f, r=600), "config/lora.py:26"),
    "required_key": (lambda f: _edit_config(f, lora_alpha="<drop>"), "peft_helper.py:162-176"),
    "modules_to_save": (lambda f: _edit_config(f, modules_to_save=["embed_tokens"]), "peft_helper.py:57-66"),
    "tensor_name": (lambda f: _add_tensor(f, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                          torch.ones(64)), "utils.py:183-236"),
}


@pytest.mark.parametrize("rule", BROKEN)
def test_the_folder_checker_refuses_what_vllm_refuses(rule, tmp_path):
    export_vllm(adapted(lorakit.AdapterConfig(r=4, target_modules=["q_proj"])), tmp_path / "v")
    assert check_vllm_folder(tmp_path / "v") == 4
    breaking, source = BROKEN[rule]
    breaking(tmp_path / "v")
    with pytest.raises(ValueError):  # vLLM's own loader (mirrored) refuses it too
        vllm_load(tmp_path / "v")
    with pytest.raises(VllmIncompatibleError, match=re.escape(source)):
        check_vllm_folder(tmp_path / "v")


def test_the_checker_catches_a_rank_pattern_that_would_scale_wrongly(tmp_path):
    export_vllm(adapted(lorakit.AdapterConfig(r=4, target_modules=["q_proj"])), tmp_path / "v")
    _edit_config(tmp_path / "v", rank_pattern={"layers.0.self_attn.q_proj": 2})
    with pytest.raises(VllmIncompatibleError, match=r"rank 4/4 where rank_pattern gives 2"):
        check_vllm_folder(tmp_path / "v")


# ---- the command ---------------------------------------------------------------------------------------------------
def saved(tmp_path, config):
    base = llama()
    base.save_pretrained(tmp_path / "base")
    lorakit.save_adapter(adapted(config, base=base), tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_export_for_vllm_prints_the_serve_line(tmp_path, capsys):
    base, adapter = saved(tmp_path, lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           rank_pattern={"v_proj": 12}))
    out = tmp_path / "for-vllm"
    assert main(["export", "--for", "vllm", str(adapter), str(out), "--model", str(base)]) == 0
    printed = capsys.readouterr().out
    assert "as a LoRA for vLLM v0.34.0, max rank 12" in printed
    assert f"--enable-lora --lora-modules for-vllm={out} --max-lora-rank 16" in printed
    assert check_vllm_folder(out) == 12


def test_export_for_vllm_refuses_dora_in_one_line(tmp_path, capsys):
    base, adapter = saved(tmp_path, lorakit.AdapterConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    capsys.readouterr()  # (transformers' save progress bar)
    code = main(["export", "--for", "vllm", str(adapter), str(tmp_path / "out"), "--model", str(base)])
    one_line_error(capsys, code, "vLLM v0.34.0 refuses DoRA", "peft_helper.py:67-68", "lorakit squeeze")
    assert not (tmp_path / "out").exists()
