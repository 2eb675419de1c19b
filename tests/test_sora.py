"""SoRA: gated LoRA ΔW = s·B·diag(g)·A (variant contract), the `sora` optimizer (AdamW + L1 gradient + proximal soft
threshold on the gates, both threshold forms), the sparsifying scheduler and pruning into a plain heterogeneous-rank
LoRA that PEFT loads."""
import json

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.data import TextDataset
from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer
from lorakit.models import tiny_llama, train_tokenizer
from lorakit.optim import make_optimizer
from lorakit.optim.sora import (SoRAOptimizer, lambda_values, reference_threshold_, soft_threshold_, sparsify_stages,
                                trainer_stages)
from lorakit.train.args import TrainingArguments
from lorakit.train.tasks import make_task
from lorakit.train.trainer import Trainer
from lorakit.variants.sora import gate_sparsity, l1_penalty, prune_sora, sora_layers

from contract import (check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp, perturb,
                      planted_task, planted_teacher, run)
from models import convnet, inputs, vit

pytestmark = pytest.mark.usefixtures("one_thread_module")

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))


def sora(r=4, **kw):
    return lorakit.AdapterConfig(r=r, lora_alpha=kw.pop("lora_alpha", 8), variant="sora",
                                 target_modules=kw.pop("target_modules", ["fc1", "fc2"]), **kw)


def sora_mlp(names=("default",), **kw):
    model = mlp()
    for i, n in enumerate(names):
        torch.manual_seed(i)
        lorakit.inject(model, sora(init_lora_weights=False, **kw), n)
        perturb(model, n, seed=i)
    return model


def variants(model, name="default"):
    return {k.rsplit("/", 1)[0]: v for k, v in sora_layers(model, name).items()}


# ---- the variant contract ----------------------------------------------------------------------------------
def test_trainable_count_is_lora_plus_r_gates():
    for r in (2, 5):
        model = mlp()
        lorakit.inject(model, sora(r=r))
        assert lorakit.count_parameters(model)[0] == 2 * (r * 64 + 64 * r + r)  # fc1, fc2: A, B, g
    model = vit()
    lorakit.inject(model, sora(r=3, target_modules=["q_proj", "v_proj", "fc1"]))
    # per ViT layer: q, v 32→32 and fc1 32→64; 2 layers
    assert lorakit.count_parameters(model)[0] == 2 * (2 * (3 * 32 + 32 * 3 + 3) + (3 * 32 + 64 * 3 + 3))


def test_init_delta_zero_gate_normal_and_gate_folded_into_factors():
    model = mlp()
    with lorakit.disabled(model):
        base = run(model, X)
    torch.manual_seed(0)
    lorakit.inject(model, sora(r=64))
    v = variants(model)["fc1"]
    assert torch.count_nonzero(v.lora_B) == 0 and torch.equal(run(model, X), base)  # ΔW = 0 at init
    assert 0.7 < v.lora_gate.std().item() < 1.3 and abs(v.lora_gate.mean().item()) < 0.3  # g ~ N(0, 1)
    ones = mlp()
    lorakit.inject(ones, sora(options={"gate_init": "ones"}))
    assert torch.equal(variants(ones)["fc1"].lora_gate, torch.ones(4))
    # ΔW = s·B·diag(g)·A, written out
    model = sora_mlp()
    v = variants(model)["fc1"]
    a, b, g = v.lora_A.detach(), v.lora_B.detach(), v.lora_gate.detach()
    expected = v.scale * b @ torch.diag(g) @ a
    assert close(v.delta_weight().detach(), expected)
    fa, fb, s = v.factors()
    assert close(fa.detach(), g[:, None] * a) and torch.equal(fb.detach(), b) and s == v.scale == 8 / 4
    with torch.no_grad():
        out = model.fc1(X)
    assert close(out, model.fc1.base_layer(X) + X @ expected.T)


def test_merge_cycle_and_save_load_save(tmp_path):
    check_merge_cycle(sora_mlp(), X)
    check_save_load_save(sora_mlp(), mlp(), X, tmp_path)
    config = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAKIT_SORA" and config["options"] == {"gate_init": "normal"}
    keys = set(lorakit.read_adapter(tmp_path / "first")[1])
    assert {"fc1.lora_gate", "fc1.lora_A.weight", "fc1.lora_B.weight"} <= keys


def test_mixed_batch():
    check_mixed_batch(sora_mlp(("a", "b")), X)


def test_planted_task():
    before, after, n = planted_task(sora(r=8, lora_alpha=8, target_modules=["fc1"]), lr=1e-2)
    assert n == 8 * 64 * 2 + 8
    assert after <= 0.5 * before, (before, after)


def test_vision_vit_and_convnet(tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    batch = inputs("vit")

    def build_vit():
        model = vit()
        torch.manual_seed(0)
        lorakit.inject(model, sora(r=4, target_modules=targets, init_lora_weights=False))
        perturb(model)
        return model
    check_merge_cycle(build_vit(), batch)
    check_save_load_save(build_vit(), vit(), batch, tmp_path / "vit")
    ids = inputs("convnet", batch=3, seq=9)

    def build_conv():
        model = convnet()
        torch.manual_seed(0)
        lorakit.inject(model, sora(r=3, target_modules=["emb", "conv", "conv2d", "head"], init_lora_weights=False))
        perturb(model)
        return model
    model = build_conv()
    assert sum(isinstance(m, AdaptedLayer) for m in model.modules()) == 4
    check_merge_cycle(model, ids)
    check_save_load_save(build_conv(), convnet(), ids, tmp_path / "conv")


def test_export_as_plain_lora_loads_in_peft(tmp_path):
    model = sora_mlp()
    lorakit.export_lora(model, tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), str(tmp_path)).eval()
    assert close(run(loaded, X), run(model, X))


# ---- the proximal optimizer --------------------------------------------------------------------------------
def test_soft_threshold_on_explicit_numbers():
    g = torch.tensor([0.5, -0.2, 0.05, -0.01, 0.1, 0.0, -0.3])
    soft_threshold_(g, 0.1)
    assert torch.allclose(g, torch.tensor([0.4, -0.1, 0.0, 0.0, 0.0, 0.0, -0.2]), atol=1e-7)
    assert (g[2:6] == 0).all()  # exact zeros, |g| = τ included
    same = torch.tensor([0.5, -0.2])
    assert torch.equal(soft_threshold_(same, 0.0), torch.tensor([0.5, -0.2]))


def test_reference_threshold_is_the_released_sparse_adamw():
    """TsinghuaC3I/SoRA src/sparse_optimizer.py L116-119, applied in order: every |g| < 2λ ends at 0 (the soft
    threshold would keep .05 and −.05), |g| = λ exactly is kept, |g| = 2λ lands on λ."""
    lam = 0.1
    for dtype in (torch.float32, torch.float64):
        g = torch.tensor([0.5, 0.15, 0.05, -0.15, -0.25], dtype=dtype)
        assert torch.allclose(reference_threshold_(g.clone(), lam), torch.tensor([0.4, 0, 0, 0, -0.15], dtype=dtype))
        assert torch.allclose(soft_threshold_(g.clone(), lam), torch.tensor([0.4, 0.05, 0, -0.05, -0.15], dtype=dtype))
        edges = torch.tensor([lam, -lam, 2 * lam, -2 * lam], dtype=dtype)
        assert torch.allclose(reference_threshold_(edges, lam), torch.tensor([lam, -lam, lam, -lam], dtype=dtype))


@pytest.mark.parametrize("lr_scaled", [False, True])
def test_default_optimizer_uses_the_reference_threshold(lr_scaled):
    """The gate after one step of the `sora` optimizer (no task or L1 gradient, so Adam leaves it alone) is the
    released map with τ = λ₂ (or λ₂·lr, the `_multiply_lr` variant)."""
    model = sora_mlp(r=8)
    gate = next(iter(variants(model).values())).lora_gate
    lr = 0.5
    opt = make_optimizer("sora", model, TrainingArguments(learning_rate=lr), sparse_lambda=0.0,
                         sparse_lambda_2=0.2 if lr_scaled else 0.1, threshold="lr" if lr_scaled else "constant")
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    with torch.no_grad():
        gate[:5] = torch.tensor([0.5, 0.15, 0.05, -0.15, -0.25])
    opt.step()
    assert torch.allclose(gate[:5].detach(), torch.tensor([0.4, 0, 0, 0, -0.15]), atol=1e-7)
    with pytest.raises(ConfigError, match="proximal"):
        make_optimizer("sora", model, TrainingArguments(), proximal="hard")


@pytest.mark.parametrize("proximal", ["reference", "soft"])
@pytest.mark.parametrize("threshold", ["constant", "lr"])
def test_optimizer_step_is_adamw_plus_l1_gradient_then_threshold(threshold, proximal):
    model = sora_mlp()
    lr, wd, lam, lam2 = 0.05, 0.1, 2.0, 0.03
    args = TrainingArguments(learning_rate=lr, weight_decay=wd)
    opt = make_optimizer("sora", model, args, sparse_lambda=lam, sparse_lambda_2=lam2, threshold=threshold,
                         proximal=proximal)
    assert isinstance(opt, SoRAOptimizer) and [g["name"] for g in opt.param_groups] == ["main", "gate"]
    vs = variants(model)
    gates = [v.lora_gate for v in vs.values()]
    others = [t for v in vs.values() for t in (v.lora_A, v.lora_B)]
    g = torch.Generator().manual_seed(5)
    for p in gates + others:
        p.grad = torch.randn(p.shape, generator=g)
    with torch.no_grad():  # Adam's first step moves each entry by lr against its gradient's sign: these land on
        gates[0][:2] = torch.tensor([lr + 0.01, -lr - 0.02])  # 0.01 and −0.02 before the threshold
        gates[0].grad[:2] = torch.tensor([5.0, -5.0])
    # the explicit computation: AdamW's first step is p − lr·wd·p − lr·sign-ish(m̂/(√v̂+ε)); do it with torch AdamW
    # on copies, the L1 gradient λ·sign(g)/N added to gate gradients, weight decay 0 on gates, then the threshold
    n = sum(p.numel() for p in gates)
    ref_gates = [p.detach().clone().requires_grad_() for p in gates]
    ref_others = [p.detach().clone().requires_grad_() for p in others]
    for r, p in zip(ref_gates, gates):
        r.grad = p.grad + lam * torch.sign(p.detach()) / n
    for r, p in zip(ref_others, others):
        r.grad = p.grad.clone()
    torch.optim.AdamW(ref_others, lr=lr, weight_decay=wd, eps=args.adam_epsilon).step()
    torch.optim.AdamW(ref_gates, lr=lr, weight_decay=0.0, eps=args.adam_epsilon).step()
    tau = lam2 * lr if threshold == "lr" else lam2
    with torch.no_grad():
        shrink = reference_threshold_ if proximal == "reference" else soft_threshold_
        expected_gates = [shrink(r.detach().clone(), tau) for r in ref_gates]
    opt.step()
    for p, e in zip(gates, expected_gates):
        assert torch.allclose(p.detach(), e, atol=1e-7)
    for p, r in zip(others, ref_others):
        assert torch.allclose(p.detach(), r.detach(), atol=1e-7)
    if threshold == "constant":  # τ = λ₂ = 0.03: both shut, exactly
        assert torch.equal(gates[0][:2].detach(), torch.zeros(2))
    else:  # τ = λ₂·lr = 1.5e-3: both shrink by τ
        assert torch.allclose(gates[0][:2].detach(), torch.tensor([0.01 - 1.5e-3, -0.02 + 1.5e-3]), atol=1e-6)


@pytest.mark.parametrize("l1", ["grad", "loss"])
def test_l1_modes_and_penalty_is_mean_abs_gate(l1):
    model = sora_mlp()
    gates = [v.lora_gate for v in variants(model).values()]
    assert close(l1_penalty(model), torch.cat([g.detach().abs() for g in gates]).mean())
    opt = make_optimizer("sora", model, TrainingArguments(learning_rate=0.1), l1=l1, sparse_lambda=5.0,
                         sparse_lambda_2=0.0)
    for p in gates:
        p.grad = torch.zeros_like(p)
    before = [g.detach().clone() for g in gates]
    opt.step()  # zero task gradient, no threshold
    for b, g in zip(before, gates):
        if l1 == "loss":  # nothing added: Adam's first step with m = 0 leaves g alone
            assert torch.equal(b, g.detach())
        else:  # λ·sign(g)/N alone: Adam's first step moves every gate lr = 0.1 towards 0
            assert torch.allclose(g.detach(), b - 0.1 * torch.sign(b), atol=1e-6)


def test_l1_grad_mode_equals_the_penalty_in_the_loss():
    """l1="grad" (the optimizer adds λ·sign(g)/N) and l1="loss" with loss + λ·mean|g| take the same steps."""
    y = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    models, opts = {}, {}
    for mode in ("grad", "loss"):
        models[mode] = sora_mlp()
        opts[mode] = make_optimizer("sora", models[mode], TrainingArguments(learning_rate=1e-2), l1=mode,
                                    sparse_lambda=0.5, sparse_lambda_2=1e-3)
    for _ in range(3):
        for mode, model in models.items():
            loss = torch.nn.functional.mse_loss(model(X), y)
            if mode == "loss":
                loss = loss + 0.5 * l1_penalty(model)
            opts[mode].zero_grad()
            loss.backward()
            opts[mode].step()
    for (k, a), (_, b) in zip(lorakit.adapter_parameters(models["grad"], "default").items(),
                              lorakit.adapter_parameters(models["loss"], "default").items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_lambda_schedules_on_explicit_numbers_and_state_round_trip(tmp_path):
    assert lambda_values(0.0, "linear", 7e-4, 8) == pytest.approx([k * 1e-4 for k in range(8)])
    assert lambda_values(1e-4, "exp_linear", 1e-2, 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    import math
    assert lambda_values(0.0, "log_linear", 1.0, 3) == pytest.approx([0.0, math.log((1 + math.e) / 2), 1.0])
    assert lambda_values(3e-4, None) == [3e-4]
    model = sora_mlp()
    opt = make_optimizer("sora", model, TrainingArguments(), sparse_lambda_2=0.0, lambda_schedule="linear",
                         max_lambda=2e-3, lambda_num=3)
    assert opt.stages == 3 and opt.lambda_2 == 0.0
    assert opt.step_lambda() and opt.lambda_2 == pytest.approx(1e-3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert opt.step_lambda() and opt.lambda_2 == pytest.approx(2e-3)
    assert not opt.step_lambda() and opt.lambda_2 == pytest.approx(2e-3)  # end of the schedule: unchanged
    again = make_optimizer("sora", model, TrainingArguments(), sparse_lambda_2=0.0, lambda_schedule="linear",
                           max_lambda=2e-3, lambda_num=3)
    again.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert again.lambda_2 == pytest.approx(1e-3) and again.gate_groups()[0]["lambda_idx"] == 1


# ---- the sparsifying scheduler and pruning -----------------------------------------------------------------
def planted_sora_run():
    """r = 16 SoRA on fc1 of the planted rank-4 task: 300 main steps (λ₂ = 1e-4), then 4 stages of 150 steps with
    λ₂ linear up to 1e-2. Returns (model, rows, test MSE before training)."""
    g = torch.Generator().manual_seed(7)
    x, x_test = torch.randn(2000, 64, generator=g), torch.randn(500, 64, generator=g)
    teacher = planted_teacher()
    with torch.no_grad():
        y, y_test = teacher(x), teacher(x_test)
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, sora(r=16, lora_alpha=16, target_modules=["fc1"]))
    opt = make_optimizer("sora", model, TrainingArguments(learning_rate=1e-2), sparse_lambda=1e-3,
                         sparse_lambda_2=1e-4, lambda_schedule="linear", max_lambda=1e-2, lambda_num=5)

    def mse(a, b):
        return torch.nn.functional.mse_loss(model(a), b)

    def train(steps):
        model.train()
        for s in range(steps):
            i = (s * 200) % 2000
            opt.zero_grad()
            mse(x[i:i + 200], y[i:i + 200]).backward()
            opt.step()
        model.eval()

    def evaluate():
        with torch.no_grad():
            return mse(x_test, y_test).item()
    before = evaluate()
    train(300)
    rows = sparsify_stages(model, opt, lambda stage: train(150), evaluate)
    return model, rows, before


def test_gates_reach_target_sparsity_on_schedule_and_prune_exactly(tmp_path):
    model, rows, before = planted_sora_run()
    assert [r["stage"] for r in rows] == list(range(5))
    assert [r["lambda_2"] for r in rows] == pytest.approx([1e-4, 2.575e-3, 5.05e-3, 7.525e-3, 1e-2])
    sparsity = [r["sparsity"] for r in rows]
    assert all(b >= a for a, b in zip(sparsity, sparsity[1:])), sparsity      # λ₂ up → more gates shut
    assert sparsity[0] <= 0.25 and sparsity[1] >= 0.5 and sparsity[-1] >= 0.5, sparsity  # target 50% by stage 1
    assert all(r["open_ranks"] >= 4 for r in rows)                              # the planted ΔW has rank 4
    assert all(r["metric"] <= 1e-3 * before for r in rows), (before, rows)     # accuracy kept while sparsifying
    assert rows[-1]["sparsity"] == gate_sparsity(model, "default")
    # prune: shut ranks cut out, outputs equal (≤ 1e-5), a plain LoRA PEFT loads
    expected = run(model, X)
    kept = int(variants(model)["fc1"].kept().sum())
    ranks = prune_sora(model, "default", directory=tmp_path / "pruned", new_name="pruned")
    assert ranks == {"fc1": kept} and kept < 16
    lorakit.set_active(model, ["pruned"])
    pruned = model.fc1.adapters["pruned"]
    assert pruned.name == "lora" and pruned.lora_A.shape == (kept, 64)
    assert close(run(model, X), expected)
    data = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == kept
    peft = PeftModel.from_pretrained(mlp(), str(tmp_path / "pruned")).eval()
    assert close(run(peft, X), expected)


def test_prune_heterogeneous_ranks_and_a_fully_shut_layer(tmp_path):
    model = sora_mlp(r=6, target_modules=["fc1", "fc2"])
    vs = variants(model)
    with torch.no_grad():
        vs["fc1"].lora_gate[[0, 3]] = 0.0                  # fc1 keeps 4 of 6
        vs["fc2"].lora_gate[1] = 0.0                       # fc2 keeps 5 of 6
    expected = run(model, X)
    ranks = prune_sora(model, directory=tmp_path / "a", new_name="pruned")
    assert ranks == {"fc1": 4, "fc2": 5}
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {data["r"], *data["rank_pattern"].values()} == {4, 5} and len(data["rank_pattern"]) == 1
    lorakit.set_active(model, ["pruned"])
    assert close(run(model, X), expected)
    assert close(run(PeftModel.from_pretrained(mlp(), str(tmp_path / "a")).eval(), X), expected)
    lorakit.set_active(model, ["default"])
    lorakit.delete_adapter(model, "pruned")
    with torch.no_grad():
        vs["fc2"].lora_gate.zero_()                        # every gate of fc2 shut: one all-zero rank kept
    expected = run(model, X)
    assert prune_sora(model, directory=tmp_path / "b") == {"fc1": 4, "fc2": 1}
    assert close(run(PeftModel.from_pretrained(mlp(), str(tmp_path / "b")).eval(), X), expected)
    # tol > 0 also cuts small gates (outputs change, by design)
    with torch.no_grad():
        vs["fc1"].lora_gate.copy_(torch.tensor([0.0, 1e-3, 1.0, 0.0, -2.0, 1.0]))
    assert prune_sora(model, new_name="cut", tol=1e-2)["fc1"] == 3          # no folder: loaded only
    assert model.fc1.adapters["cut"].lora_A.shape == (3, 64)
    assert all(v._keep is None for v in vs.values())


def test_trainer_runs_sora_optimizer_and_sparsifying_stages(tmp_path):
    texts = [f"the {n} was {a}" for n in ("film", "plot", "song", "cast") for a in ("good", "bad", "fine", "dull")]
    tok = train_tokenizer(texts, vocab_size=300)
    model = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, variant="sora", task_type="SEQ_CLS",
                                                target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=4,
                             per_device_train_batch_size=4, learning_rate=1e-2, optim="sora",
                             optim_args={"sparse_lambda": 1e-3, "sparse_lambda_2": 1e-3, "lambda_schedule": "linear",
                                         "max_lambda": 0.2, "lambda_num": 3})
    data = TextDataset(texts, [i % 2 for i in range(len(texts))])
    task = make_task("classification", tok, 16, 2)
    trainer = Trainer(model, task, args, data)
    assert isinstance(trainer.optimizer, SoRAOptimizer)
    gates0 = {p: v.lora_gate.detach().clone() for p, v in variants(model).items()}
    trainer.train()
    assert any(not torch.equal(gates0[p], v.lora_gate) for p, v in variants(model).items())
    train_stage, evaluate = trainer_stages(model, task, args, data, data, trainer.optimizer)
    rows = sparsify_stages(model, trainer.optimizer, train_stage, evaluate)
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert [r["lambda_2"] for r in rows] == pytest.approx([1e-3, 0.1005, 0.2])
    assert all("eval_accuracy" in r and r["metric"] == r["eval_accuracy"] for r in rows)
    assert rows[-1]["sparsity"] > rows[0]["sparsity"]  # a 0.2 threshold shuts gates ~N(0, 1) within 8 steps
    assert (tmp_path / "stage_2" / "metrics.jsonl").is_file()
    # a stage's checkpoint restores λ₂ and the schedule position into a fresh optimizer (resume)
    import dataclasses
    resumed = Trainer(model, task, dataclasses.replace(args, output_dir=str(tmp_path / "stage_1"), max_steps=5), data)
    assert resumed.optimizer.lambda_2 == pytest.approx(1e-3)
    resumed.train(resume=True)
    assert resumed.step == 5 and resumed.optimizer.lambda_2 == pytest.approx(0.1005)
    assert resumed.optimizer.gate_groups()[0]["lambda_idx"] == 1


# ---- errors ------------------------------------------------------------------------------------------------
def test_option_errors():
    with pytest.raises(ConfigError, match="gate_init"):
        sora(options={"gate_init": "zeros"})
    with pytest.raises(ConfigError, match="gate_inti"):
        sora(options={"gate_inti": "ones"})
    model = sora_mlp()
    args = TrainingArguments()
    bad = [({"sparse_lambda": -1.0}, "sparse_lambda"), ({"sparse_lambda_2": float("nan")}, "sparse_lambda_2"),
           ({"threshold": "lr2"}, "threshold"), ({"l1": "both"}, "l1"), ({"gate_lr": 0.0}, "gate_lr"),
           ({"lambda_schedule": "cosine", "max_lambda": 1.0, "lambda_num": 3}, "lambda_schedule"),
           ({"lambda_schedule": "linear"}, "max_lambda and lambda_num"),
           ({"lambda_schedule": "exp_linear", "sparse_lambda_2": 0.0, "max_lambda": 1.0, "lambda_num": 3},
            "exp_linear"),
           ({"lambda_schedule": "linear", "max_lambda": 1.0, "lambda_num": 0}, "lambda_num"),
           ({"sparse_lambda3": 1.0}, "sparse_lambda3")]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            make_optimizer("sora", model, args, **options)
    plain = mlp()
    lorakit.inject(plain, lorakit.AdapterConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="no trainable SoRA gate"):
        make_optimizer("sora", plain, args)
    with pytest.raises(ConfigError, match="not a SoRA adapter"):
        prune_sora(plain, "default", new_name="x")
    with pytest.raises(ConfigError, match="directory"):
        prune_sora(model)
    with pytest.raises(ConfigError, match="tol"):
        prune_sora(model, new_name="x", tol=-1.0)
    with pytest.raises(ConfigError, match="no SoRA adapter"):
        gate_sparsity(plain)


def test_closed_form_optimizers_do_not_take_sora_for_a_plain_lora():
    from lorakit.errors import UnsupportedFeatureError
    from lorakit.optim import lora_pairs, trained_adapters

    model = sora_mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules=["fc1"], init_lora_weights=False), "plain")
    assert {k.split("/")[1] for k, _ in lora_pairs(model)} == {"default", "plain"}
    with pytest.raises(UnsupportedFeatureError, match="'default' on 'fc1'.*gate"):
        trained_adapters(model, "lorapro")