"""LoRA-Squeeze (issue 7): Eckart–Young equality of the factor routes, energy rule, model and folder squeezing
(loads in PEFT), cont-squeeze and in-tuning rank annealing with the lorakit Trainer."""
import json
import math

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.data import TextDataset
from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer
from lorakit.models import tiny_llama, train_tokenizer
from lorakit.rank import RankAnnealer, cont_squeeze, energy_rank, squeeze, squeeze_adapter, squeeze_folder
from lorakit.train.args import TrainingArguments
from lorakit.train.tasks import make_task
from lorakit.train.trainer import Trainer

from contract import close, injected, mlp, run
from models import convnet, inputs

pytestmark = pytest.mark.usefixtures("one_thread_module")
TEXTS = [f"the {n} was {a}" for n in ("film", "plot", "song", "cast") for a in ("good", "bad", "fine", "dull")]


def truncation(delta, k):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def random_factors(m, n, r, seed=0, decay=2.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=g)
    b = torch.randn(m, r, generator=g) * torch.logspace(0, -decay, r)  # a decaying, distinct spectrum
    return a, b


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m,n,r,k,s", [(256, 512, 64, 8, 0.25), (40, 30, 16, 5, 2.0), (30, 40, 8, 8, 1.0)])
def test_exact_is_the_rank_k_truncation(m, n, r, k, s):
    a, b = random_factors(m, n, r)
    new_a, new_b = squeeze(a, b, s, target_rank=k)
    assert new_a.shape == (k, n) and new_b.shape == (m, k) and new_a.dtype == a.dtype
    ref = truncation(s * b.double() @ a.double(), k)
    assert rel(new_b @ new_a, ref) <= 1e-5
    left_a, left_b = squeeze(a, b, s, target_rank=k, split="left")  # B' = U Σ, A' = Vᵀ: rows orthonormal
    assert rel(left_b @ left_a, ref) <= 1e-5
    assert torch.allclose(left_a @ left_a.T, torch.eye(k), atol=1e-5)


def test_target_above_source_rank_is_clamped_and_exact():
    a, b = random_factors(20, 24, 6)
    new_a, new_b = squeeze(a, b, 0.5, target_rank=10)
    assert new_a.shape == (6, 24)
    assert rel(new_b @ new_a, 0.5 * b.double() @ a.double()) <= 1e-6


def test_rsvd_within_documented_tolerance():
    """Documented: ‖ΔW − B'A'‖_F ≤ 1.02·‖ΔW − [ΔW]_k‖_F with the defaults (oversample 10, 2 power iterations),
    also for a flat spectrum (Gaussian factors, the hard case)."""
    for decay in (2.0, 0.0):
        a, b = random_factors(256, 512, 64, seed=1, decay=decay)
        delta = 0.5 * b.double() @ a.double()
        best = (delta - truncation(delta, 8)).norm()
        new_a, new_b = squeeze(a, b, 0.5, target_rank=8, method="rsvd", generator=torch.Generator().manual_seed(0))
        err = (delta - new_b.double() @ new_a.double()).norm()
        assert err <= 1.02 * best, (decay, (err / best).item())
        if decay:
            assert rel(new_b @ new_a, truncation(delta, 8)) <= 5e-2  # near the truncation itself
    no_power = squeeze(a, b, 0.5, target_rank=8, method="rsvd", power_iters=0,
                       generator=torch.Generator().manual_seed(0))
    assert (delta - no_power[1].double() @ no_power[0].double()).norm() > err  # the power iterations help


def test_energy_picks_the_smallest_rank():
    a, b = random_factors(60, 50, 12, seed=2)
    sigma = torch.linalg.svdvals(0.7 * b.double() @ a.double())[:12]
    captured = torch.cumsum(sigma ** 2, 0) / (sigma ** 2).sum()
    want = int((captured < 0.9).sum()) + 1
    assert captured[want - 1] >= 0.9 and (want == 1 or captured[want - 2] < 0.9)
    for method in ("exact", "rsvd"):
        new_a, _ = squeeze(a, b, 0.7, energy=0.9, method=method)
        assert new_a.shape[0] == want
    assert energy_rank(torch.tensor([3.0, 4.0]), 0.64) == 2 and energy_rank(torch.tensor([4.0, 3.0]), 0.64) == 1
    for bad in (dict(), dict(target_rank=2, energy=0.5), dict(target_rank=0), dict(energy=1.5),
                dict(target_rank=2, method="qr")):
        with pytest.raises(ConfigError):
            squeeze(a, b, 1.0, **bad)


# ---- model level -------------------------------------------------------------------------------------------
def dense_reference(model, name, k):
    """A plain copy of the base MLP whose layers get W + [ΔW]_k of the adapter (the rank-k truncation)."""
    ref = mlp()
    for path, layer in model.named_modules():
        if isinstance(layer, AdaptedLayer) and name in layer.adapters:
            v = layer.adapters[name]
            with torch.no_grad():
                dw = v.delta_weight()
                row = v.row_scale(layer.kind.weight())
                if row is not None:
                    w = layer.kind.weight()
                    dw = row.reshape(-1, 1) * (w + dw) - w
                kk = k[path] if isinstance(k, dict) else k
                ref.get_submodule(path).weight.add_(truncation(dw, kk).float())
    return ref


def test_model_squeeze_is_the_truncation_and_loads_in_peft(tmp_path):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    model = injected(lorakit.AdapterConfig(r=16, lora_alpha=32, target_modules=["fc1", "fc2"],
                                           init_lora_weights=False))
    ref = dense_reference(model, "default", {"fc1": 4, "fc2": 6})
    report = squeeze_adapter(model, "default", target_rank={"fc1": 4, "fc2": 6})
    assert {p: (r["from"], r["to"], r["source"]) for p, r in report.items()} == \
        {"fc1": (16, 4, "factors"), "fc2": (16, 6, "factors")}
    config = lorakit.get_config(model)
    assert config.variant == "lora" and config.scale_for("fc1") == config.scale_for("fc2") == 1.0
    assert (config.rank_for("fc1"), config.rank_for("fc2")) == (4, 6)
    assert close(run(model, x), run(ref, x))
    assert lorakit.count_parameters(model)[0] == (4 + 6) * (64 + 64)
    lorakit.save_adapter(model, tmp_path / "sq")
    peft = PeftModel.from_pretrained(mlp(), str(tmp_path / "sq")).eval()
    assert close(run(peft, x), run(model, x))
    fresh = lorakit.load_adapter(mlp(), tmp_path / "sq")
    assert close(run(fresh, x), run(model, x))


def test_energy_and_other_variants(tmp_path):
    """Any mergeable variant: VeRA through its factors, DoRA through the dense-ΔW fallback (effective change)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    vera = injected(lorakit.AdapterConfig(r=8, variant="vera", target_modules=["fc1"]), seed=1)
    ref = dense_reference(vera, "default", 3)
    report = squeeze_adapter(vera, "default", target_rank=3, method="rsvd", oversample=5)  # width 8 = r: exact
    assert report["fc1"]["source"] == "factors" and report["fc1"]["to"] == 3
    assert close(run(vera, x), run(ref, x), tol=1e-4)
    dora = injected(lorakit.AdapterConfig(r=8, use_dora=True, target_modules=["fc1"], init_lora_weights=False),
                    seed=2)
    dw = dense_reference(dora, "default", 64).fc1.weight - mlp().fc1.weight
    sigma = torch.linalg.svdvals(dw.double())
    k = energy_rank(sigma, 0.95)
    assert k > 8  # the magnitude change makes DoRA's effective ΔW full rank: more than r is kept
    ref = dense_reference(dora, "default", k)
    report = squeeze_adapter(dora, "default", energy=0.95)
    assert report["fc1"]["source"] == "dense" and (report["fc1"]["from"], report["fc1"]["to"]) == (8, k)
    assert close(run(dora, x), run(ref, x), tol=1e-4)
    sigma = sigma.detach()
    assert report["fc1"]["energy"] == pytest.approx(float((sigma[:k] ** 2).sum() / (sigma ** 2).sum()), rel=1e-6)


def test_squeeze_folder_matches_model_squeeze(tmp_path):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    model = injected(lorakit.AdapterConfig(r=12, lora_alpha=6, use_rslora=True, target_modules=["fc1", "fc2"],
                                           init_lora_weights=False), seed=3)
    lorakit.save_adapter(model, tmp_path / "src")
    report = squeeze_folder(tmp_path / "src", tmp_path / "dst", target_rank=5)
    assert {r["to"] for r in report.values()} == {5}
    squeeze_adapter(model, "default", target_rank=5)
    data = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert data["r"] == data["lora_alpha"] == 5 and data["peft_type"] == "LORA"
    peft = PeftModel.from_pretrained(mlp(), str(tmp_path / "dst")).eval()
    assert close(run(peft, x), run(model, x))


def test_conv_and_embedding_layers(tmp_path):
    """Embedding, Conv1d, Conv2d and Linear: re-factoring at the same rank keeps outputs; model and folder routes
    agree at a smaller rank and PEFT loads the result."""
    x = inputs("convnet")
    model = injected(lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["emb", "conv", "conv2d", "head"],
                                           init_lora_weights=False), model=convnet())
    before = run(model, x)
    lorakit.save_adapter(model, tmp_path / "src")
    squeeze_adapter(model, "default", target_rank=4)
    assert close(run(model, x), before)
    squeeze_adapter(model, "default", target_rank=2)
    squeeze_folder(tmp_path / "src", tmp_path / "dst", target_rank=2)
    assert not close(run(model, x), before)
    peft = PeftModel.from_pretrained(convnet(), str(tmp_path / "dst")).eval()
    assert close(run(peft, x), run(model, x))


def test_cont_squeeze_trains_at_the_new_rank():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 64, generator=g)
    y = mlp(seed=9)(x).detach()
    model = injected(lorakit.AdapterConfig(r=16, target_modules=["fc1"], init_lora_weights=False))
    losses = []

    def train(m):
        params = [p for p in m.parameters() if p.requires_grad]
        assert {tuple(p.shape) for p in params} == {(4, 64), (64, 4)}
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(20):
            loss = torch.nn.functional.mse_loss(m(x), y)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = cont_squeeze(model, train, target_rank=4)
    assert report["fc1"]["to"] == 4 and losses[-1] < losses[0]


def test_cont_squeeze_with_the_trainer(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=8, task_type="SEQ_CLS", init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=50,
                             per_device_train_batch_size=4, learning_rate=1e-2)
    data = TextDataset(TEXTS, [i % 2 for i in range(len(TEXTS))])
    made = []

    def make_trainer(m):
        made.append(Trainer(m, make_task("classification", tok, 16, 2), args, data))
        return made[0]
    report = cont_squeeze(model, make_trainer, steps=3, target_rank=2)
    assert {r["to"] for r in report.values()} == {2} and made[0].step == 3
    optimized = {id(p) for g in made[0].optimizer.param_groups for p in g["params"]}
    lora = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert len(lora) == 4 and all(p.shape[0] == 2 and id(p) in optimized for p in lora.values())
    assert all(math.isfinite(r["loss"]) for r in made[0].history if "loss" in r)


# ---- in-tuning annealing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_annealing_reaches_target_on_schedule(tmp_path, schedule):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=8, lora_alpha=16, task_type="SEQ_CLS", init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
    if schedule == "linear":  # registered on the model: the trainer finds it
        annealer, hooks = RankAnnealer(model, "default", r_target=2, cuts=3, start=1, end=7).attach(), []
    else:  # passed as a hook without a model (as to lorakit.train.run.train): binds to trainer.model
        annealer = RankAnnealer(None, "default", r_target=2, cuts=3, start=1, end=7, schedule=schedule)
        hooks = [annealer]
    seen = []

    class Watch:
        def after_optimizer_step(self, trainer):  # user hooks run before the model's: ranks before this step's cut
            ranks = {v.r for m in model.modules() if isinstance(m, AdaptedLayer) for v in m.adapters.values()}
            opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            live = {id(p) for p in model.parameters() if p.requires_grad}
            assert opt_ids == live  # no stale parameters, none missing
            assert all(id(p) in live for p in trainer.optimizer.state)  # no state left for removed ones
            seen.append((trainer.step + 1, ranks))

    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=10,
                             per_device_train_batch_size=4, learning_rate=1e-2)
    data = TextDataset(TEXTS, [i % 2 for i in range(len(TEXTS))])
    trainer = Trainer(model, make_task("classification", tok, 16, 2), args, data, hooks=[Watch(), *hooks])
    assert annealer in trainer.hooks
    history = trainer.train()
    cuts = annealer.cut_steps(10)
    assert cuts == [3, 5, 7]
    expected = [8 - (8 - 2) * (t if schedule == "linear" else (1 - math.cos(math.pi * t)) / 2)
                for t in (1 / 3, 2 / 3, 1)]
    assert [s for s, _ in annealer.done] == cuts
    assert [set(r.values()) for _, r in annealer.done] == [{round(e)} for e in expected]
    rank_after = {s: r for s, r in seen}  # ranks seen at step s are those after the cut of step s − 1
    assert rank_after[1] == {8} and rank_after[4] == {round(expected[0])} and rank_after[8] == {2}
    assert all(math.isfinite(r["loss"]) for r in history if "loss" in r)
    assert len([r for r in history if "loss" in r]) >= 1 and trainer.step == 10
    config = lorakit.get_config(model)
    assert config.r == 2 and config.scale_for("model.layers.0.self_attn.q_proj") == pytest.approx(2.0)
    lorakit.save_adapter(model, tmp_path / "annealed")
    fresh = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
    lorakit.load_adapter(fresh, tmp_path / "annealed")
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    assert close(run(fresh.eval(), dict(batch)), run(model.eval(), dict(batch)))


def test_annealing_cut_is_the_truncation_in_a_plain_loop():
    model = injected(lorakit.AdapterConfig(r=8, target_modules=["fc1"], init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    model(x).pow(2).mean().backward()
    opt.step()
    ref = dense_reference(model, "default", 3)
    annealer = RankAnnealer(model, r_target=3, cuts=1, start=0, end=1)
    assert annealer.step(1, 10, opt)
    assert close(run(model, x), run(ref, x))
    assert not opt.state and {id(p) for p in opt.param_groups[0]["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ConfigError):
        RankAnnealer(model, r_target=0)
    with pytest.raises(ConfigError):
        RankAnnealer(model, r_target=2, schedule="step")


def test_experiment_script_at_tiny_size(tmp_path):
    """bench/squeeze_experiment.py end to end on tiny-llama: five methods, table, plot; ranks as intended."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import squeeze_experiment

    data = tmp_path / "data.jsonl"
    words = ("awful dull bad poor".split(), "great fine good nice".split())
    data.write_text("".join(json.dumps({"text": f"the film was {words[i % 2][i % 4]}", "label": i % 2}) + "\n"
                            for i in range(64)))
    rows = squeeze_experiment.main([
        "--seeds", "1", "--r-src", "8", "--r-tgt", "2", "--output-dir", str(tmp_path / "out"),
        "--docs-dir", str(tmp_path / "docs"), "--set", "model=tiny-llama", f"data={data}", "max_steps=4",
        "max_train_samples=0", "max_eval_samples=0", "per_device_train_batch_size=8", "target_modules=[q_proj]",
        "learning_rate=0.01"])
    assert [r["method"] for r in rows] == squeeze_experiment.METHODS
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert (tmp_path / "docs" / "squeeze_experiment.png").is_file()
    assert "| cont-squeeze |" in (tmp_path / "docs" / "squeeze_experiment.md").read_text()
    for folder, r in [("direct-0", 2), ("r8-0", 8), ("post-squeeze-0", 2), ("cont-squeeze-0", 2), ("anneal-0", 2)]:
        config = json.loads((tmp_path / "out" / folder / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == r, folder
    results = json.loads((tmp_path / "out" / "cont-squeeze-0" / "results.json").read_text())
    assert results["steps"] == 1


def test_cli_squeeze_writes_a_lower_rank_folder(tmp_path, capsys):
    from lorakit.cli import main

    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=8, lora_alpha=16, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "src")
    assert main(["squeeze", str(tmp_path / "src"), str(tmp_path / "dst"), "--rank", "3"]) == 0
    assert "r   8 -> 3" in capsys.readouterr().out
    config, tensors = lorakit.read_adapter(tmp_path / "dst")
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {3}
    assert main(["squeeze", str(tmp_path / "src"), str(tmp_path / "dst2")]) == 2
    assert "exactly one of --r K" in capsys.readouterr().err


# ---- folders that need their base model: squeeze (and export, merge) from the command line (issue 16) ------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A saved tiny Llama (causal LM) and tokenizer: the base the adapter folders below name."""
    from lorakit.models import save_base

    tokenizer = train_tokenizer(TEXTS)
    folder = tmp_path_factory.mktemp("base") / "tiny"
    save_base(tiny_llama(len(tokenizer), seed=0, pad_token_id=tokenizer.pad_token_id), tokenizer, str(folder))
    return folder


def adapter_on_base(base, variant, folder, r=4):
    """The base with a perturbed `variant` adapter on q_proj/v_proj, saved to `folder`; returns the model."""
    from lorakit.models import load_model

    model, _ = load_model(str(base), "causal-lm")
    config = lorakit.AdapterConfig(r=r, variant=variant, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False if variant in ("lora", "dora") else True,
                                   base_model_name_or_path=str(base), task_type="CAUSAL_LM")
    injected(config, model=model)
    lorakit.save_adapter(model, folder)
    return model


def logits(model):
    ids = torch.arange(4, 19).reshape(3, 5)
    with torch.no_grad():
        return model(input_ids=ids).logits


def on_base(base, folder):
    from lorakit.models import load_model

    model, _ = load_model(str(base), "causal-lm")
    return lorakit.load_adapter(model, folder)


@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_cli_squeezes_any_variant_on_its_base(variant, tiny_base, tmp_path, capsys):
    """DoRA (dense effective ΔW) and PiSSA (rank-2r factors) folders: squeezed on the base the folder names, equal
    to `squeeze_adapter` on the model; the result is a plain LoRA."""
    from lorakit.cli import main

    model = adapter_on_base(tiny_base, variant, tmp_path / "src")
    with pytest.raises(ConfigError, match="base model"):
        squeeze_folder(tmp_path / "src", tmp_path / "x", target_rank=2)
    assert main(["squeeze", str(tmp_path / "src"), str(tmp_path / "dst"), "--r", "2"]) == 0
    assert "r   4 -> 2" in capsys.readouterr().out
    report = squeeze_adapter(model, "default", target_rank=2)
    assert {r["source"] for r in report.values()} == {"dense" if variant == "dora" else "factors"}
    config, _ = lorakit.read_adapter(tmp_path / "dst")
    assert (config.variant, config.use_dora, config.r) == ("lora", False, 2)
    assert config.base_model_name_or_path == str(tiny_base)
    assert close(logits(on_base(tiny_base, tmp_path / "dst")), logits(model))


@pytest.mark.parametrize("variant, rank", [("pissa", 8), ("vera", 4)])
def test_cli_export_writes_the_same_change_as_a_peft_lora(variant, rank, tiny_base, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.models import load_model

    model = adapter_on_base(tiny_base, variant, tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "plain")]) == 0
    assert f"as a PEFT LoRA, rank {rank}" in capsys.readouterr().out
    data = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == rank
    peft = PeftModel.from_pretrained(load_model(str(tiny_base), "causal-lm")[0], str(tmp_path / "plain")).eval()
    assert close(logits(peft), logits(model))


def test_cli_merge_folds_dora_into_a_transformers_model(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    model = adapter_on_base(tiny_base, "dora", tmp_path / "src")
    assert main(["merge", str(tmp_path / "src"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert close(logits(merged), logits(model))
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "plain")]) == 2  # DoRA's ΔW is full rank
    assert "`lorakit squeeze` writes its best low-rank plain LoRA" in capsys.readouterr().err
