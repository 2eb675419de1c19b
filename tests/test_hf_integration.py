"""Working the way transformers and PEFT users work: save_pretrained / from_pretrained on an injected model, a real
transformers.Trainer run whose checkpoints hold the adapter, the one-call loader, label names, hot-swapping a
checkpoint into a live adapter, one trained head at a time, a warning for LoRA on a random head, file modes."""
from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch
from contract import close, perturb
from models import llama, minilm

import lorakit
from lorakit.errors import AdapterNameError, StateDictError
from lorakit.io.files import read_labels

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Llama saved as a transformers folder (the base an adapter's config can name)."""
    path = tmp_path / "base"
    llama().save_pretrained(path)
    return path


def injected_llama(base_dir, seed=0, **config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                   **config}))
    perturb(model, seed=seed)
    return model


def test_save_pretrained_writes_the_adapter_and_from_pretrained_reloads_it(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = injected_llama(base_dir)
    model.save_pretrained(tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no full state dict with base_layer keys
    config, _ = lorakit.read_adapter(tmp_path / "out")
    assert config.base_model_name_or_path == str(base_dir) and config.task_type == "CAUSAL_LM"
    expected = logits(model)
    assert not close(expected, logits(AutoModelForCausalLM.from_pretrained(base_dir)))  # the adapter matters
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # transformers + PEFT
    assert close(logits(via_transformers), expected)
    assert close(logits(lorakit.from_pretrained(tmp_path / "out")), expected)  # lorakit's one call
    # a second adapter goes to a sub-folder (PEFT's layout); merged and unloaded, the model saves in full again
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["o_proj"]), "extra")
    model.save_pretrained(tmp_path / "two")
    assert (tmp_path / "two" / "extra" / "adapter_config.json").is_file()
    plain = lorakit.merge_and_unload(model)
    plain.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full")), logits(plain))


def test_transformers_trainer_checkpoints_hold_the_adapter(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = injected_llama(base_dir).train()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12),
                                                                         generator=torch.Generator().manual_seed(1))]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=2)
    Trainer(model=model, args=args, train_dataset=data).train()
    for step in (2, 4):
        folder = tmp_path / "hf" / f"checkpoint-{step}"
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lorakit.load_adapter(reloaded, tmp_path / "hf" / "checkpoint-4")
    assert close(logits(reloaded), logits(model))
    assert not close(logits(reloaded), logits(injected_llama(base_dir)))  # the trained adapter, not the initial one


def test_hot_swap_replaces_weights_in_place_or_refuses(base_dir, tmp_path):
    injected_llama(base_dir, seed=1).save_pretrained(tmp_path / "a")
    injected_llama(base_dir, seed=2).save_pretrained(tmp_path / "b")
    injected_llama(base_dir, seed=2, r=8).save_pretrained(tmp_path / "wide")
    injected_llama(base_dir, seed=2, lora_alpha=4).save_pretrained(tmp_path / "alpha")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lorakit.load_adapter(model, tmp_path / "a", "live")
    a_params = {k: t for k, t in lorakit.adapter_parameters(model, "live").items()}
    lorakit.load_adapter(model, tmp_path / "b", "live")  # the same tensors, new values
    assert all(lorakit.adapter_parameters(model, "live")[k] is t for k, t in a_params.items())
    assert close(logits(model), logits(lorakit.from_pretrained(tmp_path / "b")))
    before = logits(model)
    for folder, what in (("wide", "shape"), ("alpha", "scale")):
        with pytest.raises(StateDictError, match=what):
            lorakit.load_adapter(model, tmp_path / folder, "live")
        assert torch.equal(logits(model), before)  # unchanged


def test_two_active_adapters_with_trained_heads_are_refused():
    model = minilm()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"), name)
    with pytest.raises(AdapterNameError, match="classifier"):
        lorakit.set_active(model, ["a", "b"])
    assert lorakit.active_adapters(model) == ["a"]
    model2 = minilm()
    lorakit.inject(model2, lorakit.AdapterConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"), "a")
    lorakit.inject(model2, lorakit.AdapterConfig(r=2, target_modules=["value"]), "no_head")
    lorakit.set_active(model2, ["a", "no_head"])  # one head among them is fine


def test_lora_on_a_fresh_head_warns_and_task_type_does_not():
    from lorakit.models import load_model

    model, _ = load_model("minilm", "classification")
    with pytest.warns(UserWarning, match=r"\['classifier'\].*task_type='SEQ_CLS'"):
        lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules="all-linear"))
    model, _ = load_model("minilm", "classification")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))


def test_classifier_labels_and_base_round_trip_through_the_one_call_loader(tmp_path):
    from lorakit.models import load_model, minilm_dir

    model, _ = load_model("minilm", "classification", num_labels=3)
    model.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "cls")
    assert read_labels(tmp_path / "cls") == {0: "negative", 1: "neutral", 2: "positive"}
    config, _ = lorakit.read_adapter(tmp_path / "cls")
    assert config.base_model_name_or_path == str(minilm_dir())
    loaded = lorakit.from_pretrained(tmp_path / "cls")
    assert loaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 2204, 102]])}
    with torch.no_grad():
        assert close(loaded(**batch).logits, model(**batch).logits)


def test_files_get_the_umask_modes_peft_gets(tmp_path):
    old = os.umask(0o022)
    try:
        model = llama()
        lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["q_proj"]))
        lorakit.save_adapter(model, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "out" / f).stat().st_mode) == 0o644


def test_a_run_names_its_classes_and_saves_them_with_the_adapter(tmp_path):
    from lorakit.data import TextDataset, split
    from lorakit.hf import labels
    from lorakit.io.files import write_folder
    from lorakit.train.run import name_labels

    data = TextDataset([f"text {i}" for i in range(40)], [i % 2 for i in range(40)], label_names=("neg", "pos"))
    train = split(data, seed=0).train.select(10, seed=0)
    assert train.label_names == ("neg", "pos")  # splits and samples keep the names
    model = minilm()
    name_labels(model, train.label_names)
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    write_folder(tmp_path / "a", lorakit.get_config(model), lorakit.adapter_parameters(model, "default"),
                 id2label=labels(model))
    assert read_labels(tmp_path / "a") == {0: "neg", 1: "pos"}
    unnamed = minilm()  # transformers' LABEL_0, LABEL_1 are not names: nothing written
    lorakit.inject(unnamed, lorakit.AdapterConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lorakit.save_adapter(unnamed, tmp_path / "b")
    assert read_labels(tmp_path / "b") is None


def test_make_model_folder_gets_the_umask_mode(tmp_path):
    from lorakit.serve.model_dir import make_model

    old = os.umask(0o022)
    try:
        out = make_model(tmp_path / "m", hidden_size=32, num_layers=1, vocab_size=300, max_position_embeddings=64)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
