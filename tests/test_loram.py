"""LoRAM (training card §8): LoRA trained on a pruned model, recovered to the full model by zero-filling."""
import copy
import dataclasses

import pytest
import torch

import lorakit
import models
from contract import close, perturb, run
from lorakit.errors import ModelError
from lorakit.layers import AdaptedLayer
from lorakit.rank.loram import pruned_copy, prune_structured, recover_adapter
from lorakit.rank.prune import parameter_count

pytestmark = pytest.mark.usefixtures("one_thread_module")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pruned_llama(metric="magnitude"):
    full = models.llama()
    small = copy.deepcopy(full)
    record = prune_structured(small, 0.5, metric=metric, skip_last=False)
    torch.manual_seed(0)
    lorakit.inject(small, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                init_lora_weights=False))
    perturb(small)
    return full, small, record


def test_recovered_delta_is_the_pruned_delta_zero_filled():
    full, small, record = _pruned_llama()
    assert parameter_count(small) < parameter_count(full)
    recover_adapter(small, full, "default", record)
    small_mods, n = dict(small.named_modules()), 0
    for path, mod in full.named_modules():
        if not isinstance(mod, AdaptedLayer):
            continue
        big = mod.adapters["default"].delta_weight()
        assert big.shape == mod.base_layer.weight.shape
        entry = record.modules.get(path, {})
        rows = torch.tensor(entry["out"]) if entry.get("out") else torch.arange(big.shape[0])
        cols = torch.tensor(entry["in"]) if entry.get("in") else torch.arange(big.shape[1])
        kept = big.index_select(0, rows).index_select(1, cols)
        assert torch.allclose(kept, small_mods[path].adapters["default"].delta_weight(), atol=1e-7)
        zero = big.clone()
        zero[rows[:, None], cols[None, :]] = 0
        assert zero.abs().max() == 0  # pruned rows/columns of ΔW are exactly zero
        n += int(entry.get("out") is not None or entry.get("in") is not None)
    assert n == 14  # 7 pruned Linear modules in each of the 2 layers
    assert not any(p.requires_grad for p in full.parameters())


def test_recovered_full_model_restricted_to_kept_structure_matches_and_merges():
    full, small, record = _pruned_llama(metric="random")
    batch = models.inputs("llama")
    want = run(small, batch)
    recover_adapter(small, full, "default", record)
    # the full model with the recovered adapter, pruned by the same record, is the pruned model with its adapter
    assert close(run(pruned_copy(full, record), batch), want)
    out = run(full, batch)
    with lorakit.disabled(full):
        assert not close(run(full, batch), out, 1e-3)  # the recovered adapter changes the full model
    merged = lorakit.merge_and_unload(full)
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert close(run(merged, batch), out)


def test_minilm_classifier_head_is_recovered():
    full, batch = models.minilm(), models.inputs("minilm")
    small = copy.deepcopy(full)
    record = prune_structured(small, 0.5, heads=False)  # channels only, layers 0-4
    torch.manual_seed(0)
    lorakit.inject(small, lorakit.AdapterConfig(r=2, lora_alpha=4, target_modules=["intermediate.dense",
                                                                                    "output.dense"],
                                                init_lora_weights=False, task_type="SEQ_CLS"))
    perturb(small)
    want = run(small, batch)
    recover_adapter(small, full, "default", record)
    assert torch.equal(full.classifier.copies["default"].weight, small.classifier.copies["default"].weight)
    assert close(run(pruned_copy(full, record), batch), want)


def test_norm_a_fills_pruned_columns_and_keeps_kept_ones():
    full, small, record = _pruned_llama()
    recover_adapter(small, full, "default", record, norm_a=True)
    path = "model.layers.0.mlp.down_proj"
    a = dict(full.named_modules())[path].adapters["default"].lora_A
    kept = torch.tensor(record.modules[path]["in"])
    pruned = torch.tensor(sorted(set(range(a.shape[1])) - set(kept.tolist())))
    assert torch.equal(a[:, kept], dict(small.named_modules())[path].adapters["default"].lora_A)
    r = a.shape[0]
    print(f"norm_a: {a[:, pruned].numel()} filled entries, std {a[:, pruned].std().item():.4f} (1/r = {1 / r})")
    assert a[:, pruned].abs().min() > 0 and a[:, pruned].std().item() == pytest.approx(1 / r, rel=0.05)


def test_recover_needs_a_record():
    full, small, _ = _pruned_llama()
    with pytest.raises(ModelError, match="PruningRecord"):
        recover_adapter(small, full, "default")


def test_loram_experiment_entry_point_tiny(tmp_path):
    from lorakit.rank.loram import loram_experiment
    from test_loraprune import tiny_run_config

    res = loram_experiment(tiny_run_config(tmp_path), skip_last=False, align=["the film was good", "a dull film"])
    assert res["parameters_pruned"] < res["parameters_full"]
    assert res["align_texts"] == 2 and res["align_loss_last"] > 0
    for key in ("frozen_encoder_test_accuracy", "pruned_test_accuracy", "test_accuracy"):
        assert 0 <= res[key] <= 1


def test_record_round_trips_through_json():
    import json

    from lorakit.rank.prune import PruningRecord

    full, small, record = _pruned_llama()
    again = PruningRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    batch = models.inputs("llama")
    with lorakit.disabled(small):
        assert close(run(pruned_copy(full, again), batch), run(small, batch))


def test_script_entry_point_tiny(tmp_path, capsys):
    import json

    import yaml

    from lorakit.rank.__main__ import main
    from test_loraprune import tiny_run_config

    flat = tiny_run_config(tmp_path).to_flat()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({k: flat[k] for k in (
        "model", "data", "r", "target_modules", "init_lora_weights", "learning_rate", "max_steps",
        "per_device_train_batch_size", "disable_tqdm", "output_dir")}))
    main(["--config", str(tmp_path / "run.yaml"), "--metrics", "magnitude", "--out", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())["magnitude"]
    assert res["parameters_after"] < res["parameters_before"] and (tmp_path / "run" / "magnitude").is_dir()
    main(["--config", str(tmp_path / "run.yaml"), "--experiment", "loram", "--align-data", flat["data"],
          "--align-samples", "8", "--out", str(tmp_path / "l.json")])
    res = json.loads((tmp_path / "l.json").read_text())["loram"]
    assert res["align_texts"] == 8 and (tmp_path / "run" / "loram").is_dir()


def test_pruned_base_saves_and_loads(tmp_path):
    from lorakit.rank.prune import load_pruned, save_pruned

    full, batch = models.llama(), models.inputs("llama")
    record = prune_structured(full, 0.5, metric="random", skip_last=False)
    save_pruned(full, record, str(tmp_path))
    again, rec = load_pruned(str(tmp_path))
    assert rec == record and parameter_count(again) == parameter_count(full)
    assert close(run(again, batch), run(full, batch))


def test_alignment_moves_the_pruned_model_towards_the_full_one():
    from lorakit.models import train_tokenizer
    from lorakit.rank.loram import align_pruned

    texts = [f"the film was {w} and {v}" for w in ("good", "bad", "long", "fine") for v in ("sad", "nice", "odd")]
    tok = train_tokenizer(texts)
    full = models.llama(vocab_size=len(tok))
    small = copy.deepcopy(full)
    prune_structured(small, 0.5, metric="random", skip_last=False)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    small.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in small.parameters()]
    first = align_pruned(small, full, tok, texts, epochs=8, lr=3e-3, batch_size=6, progress=False)
    assert len(first) == 8 * 2 and sum(first[-2:]) < 0.5 * sum(first[:2])  # layer-wise error at least halves
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())  # the teacher is only read
    assert [p.requires_grad for p in small.parameters()] == flags and not small.training  # flags restored
    with pytest.raises(ModelError, match="at least one text"):
        align_pruned(small, full, tok, [])
    lorakit.inject(small, lorakit.AdapterConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ModelError, match="before injecting"):
        align_pruned(small, full, tok, texts)


def test_align_texts_are_seeded_and_bounded(tmp_path):
    from lorakit.rank.loram import align_texts
    from test_loraprune import tiny_run_config

    spec = tiny_run_config(tmp_path).data
    a, b = align_texts(spec, 10, seed=1), align_texts(spec, 10, seed=1)
    assert a == b and len(a) == 10 and len(set(a)) > 1


def test_training_runs_on_a_saved_pruned_base(tmp_path):
    """`lorakit train --model DIR` on a base written by save_pruned: the pruned shapes, weights and tokenizer."""
    from lorakit.models import load_model
    from lorakit.rank.prune import save_pruned
    from lorakit.train.run import train
    from test_loraprune import tiny_run_config

    config = tiny_run_config(tmp_path)
    causal, tok = load_model("tiny-llama", "causal-lm", texts=["the film was good", "a dull and sad film"])
    record = prune_structured(causal, 0.5, metric="random", skip_last=False)
    save_pruned(causal, record, str(tmp_path / "pruned"), tokenizer=tok)

    again, tok2 = load_model(str(tmp_path / "pruned"), "causal-lm")
    assert parameter_count(again) == parameter_count(causal) < parameter_count(models.llama())
    ids = tok(["the film was good"], return_tensors="pt")
    assert torch.equal(again(**ids).logits, causal(**ids).logits) and len(tok2) == len(tok)

    classifier, _ = load_model(str(tmp_path / "pruned"), "classification", num_labels=2)  # a fresh 2-label head
    assert classifier.score.weight.shape[0] == 2
    assert torch.equal(classifier.model.layers[0].mlp.up_proj.weight, causal.model.layers[0].mlp.up_proj.weight)

    results = train(dataclasses.replace(config, model=str(tmp_path / "pruned")))
    assert 0 <= results["test_accuracy"] <= 1
