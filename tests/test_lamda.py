"""LaMDA: frozen A, trainable r×r S and B, B frozen column by column by a step schedule (lorakit Trainer hooks or
`gradual_freeze` in a plain loop); LaMDA++ ranks from the normalized spectrum of each W."""
import json
import os

import pytest
import torch

import lorakit
from lorakit.data import TextDataset
from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer
from lorakit.models import tiny_llama, train_tokenizer
from lorakit.train.args import TrainingArguments
from lorakit.train.tasks import make_task
from lorakit.train.trainer import Trainer
from lorakit.variants.lamda import gradual_freeze, plus_plus_ranks

from contract import (check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp, perturb,
                      planted_task, run)
from models import convnet, inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
X = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))


def lamda(r=4, **kw):
    return lorakit.AdapterConfig(r=r, variant="lamda", target_modules=kw.pop("target_modules", ["fc1", "fc2"]), **kw)


def variants(model, name="default"):
    return {p: m.adapters[name] for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters}


def lamda_mlp(names=("default",)):
    model = mlp()
    for i, n in enumerate(names):
        torch.manual_seed(i)
        lorakit.inject(model, lamda(r=4 + i, options={"init": "svd"} if i % 2 else {}), n)
        perturb(model, n, seed=i)
    return model


def test_trainable_count_while_b_trains_and_after_the_schedule():
    r = 3
    model = mlp()
    lorakit.inject(model, lamda(r=r))
    assert lorakit.count_parameters(model)[0] == 2 * (r * r + 64 * r)  # S (r²) + B (m·r) on fc1, fc2
    with gradual_freeze(model, step=9, total_steps=10):  # t = ⌊10 / 3⌋ = 3 ≥ r: B frozen
        pass
    assert lorakit.count_parameters(model)[0] == 2 * r * r


def test_init_released_code_and_svd_reading():
    model = mlp()
    w = model.fc1.weight.detach().clone()
    lorakit.inject(model, lamda(r=4))
    v = variants(model)["fc1"]
    assert torch.count_nonzero(v.lora_B) == 0 and v.lora_A.abs().max() <= 64 ** -0.5  # A kaiming U(±1/√n), B = 0
    assert torch.count_nonzero(v.lora_R) == 16 and v.lora_R.abs().max() <= 4 ** -0.5  # S as nn.Linear(r, r)
    assert not v.lora_A.requires_grad and v.lora_B.requires_grad and v.lora_R.requires_grad
    with lorakit.disabled(model):
        base = run(model, X)
    assert torch.equal(run(model, X), base)  # ΔW = 0
    svd = mlp()
    lorakit.inject(svd, lamda(r=4, options={"init": "svd"}))
    v = variants(svd)["fc1"]
    u, s, vh = torch.linalg.svd(w)
    assert close((v.lora_B * s[:4]) @ v.lora_A, (u[:, :4] * s[:4]) @ vh[:4])  # B = U_r, A = V_rᵀ of W
    assert torch.count_nonzero(v.lora_R) == 0 and torch.equal(run(svd, X), base)


def test_schedules():
    model = mlp()
    lorakit.inject(model, lamda(r=4))
    v = variants(model)["fc1"]
    assert [v.frozen_columns(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # ⌊(k+1)/3⌋
    lorakit.inject(model, lamda(r=4, options={"schedule": "linear", "eta": 0.5}), "lin")
    v = variants(model, "lin")["fc1"]
    assert [v.frozen_columns(k, 10) for k in range(10)] == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4]  # ⌊4(k+1)/5⌋


def test_plain_loop_frozen_columns_do_not_move_and_then_only_s_trains():
    """AdamW with weight decay would keep moving zero-gradient columns; `gradual_freeze` keeps them fixed."""
    r, total = 4, 8
    model = mlp()
    lorakit.inject(model, lamda(r=r, init_lora_weights=False, options={"schedule": "linear", "eta": 0.5}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    y = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    vs = list(variants(model).values())
    for step in range(total):
        before = [(v.lora_B.detach().clone(), v.lora_R.detach().clone()) for v in vs]
        torch.nn.functional.mse_loss(model(X), y).backward()
        with gradual_freeze(model, step, total):
            opt.step()
        opt.zero_grad()
        t = min(step + 1, r)  # ⌊r·(k+1)/(η·T)⌋ = k + 1
        for v, (b, s) in zip(vs, before):
            assert torch.equal(v.lora_B[:, :t], b[:, :t])
            assert t == r or (v.lora_B[:, t:] != b[:, t:]).any()
            assert not torch.equal(v.lora_R, s)  # S trains throughout
            assert v.lora_B.requires_grad == (t < r)
    assert lorakit.count_parameters(model)[0] == 2 * r * r


CLASS_TEXTS = [f"the {n} was {a}" for n in ("film", "plot", "song", "cast") for a in ("good", "bad", "fine", "dull")]


def test_trainer_freezes_b_columns_by_the_schedule(tmp_path):
    """The real lorakit Trainer (AdamW, weight decay) runs the variant's hooks: frozen columns stay fixed."""
    tok = train_tokenizer(CLASS_TEXTS, vocab_size=300)
    model = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
    r, total = 2, 8
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=r, variant="lamda", task_type="SEQ_CLS", init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
    vs = variants(model)
    head = sum(p.numel() for n, p in model.named_parameters() if ".copies." in n)
    assert lorakit.count_parameters(model)[0] == head + sum(
        r * r + v.kind.out_features * r for v in vs.values())

    class Snapshots:
        def __init__(self):
            self.seen = []

        def before_optimizer_step(self, trainer):  # runs before the variants' hooks: the state after the last step
            self.seen.append((trainer.step, {p: (v.lora_B.detach().clone(), v.lora_R.detach().clone())
                                             for p, v in vs.items()}))

    snaps = Snapshots()
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=total,
                             per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1)
    data = TextDataset(CLASS_TEXTS, [i % 2 for i in range(len(CLASS_TEXTS))])
    trainer = Trainer(model, make_task("classification", tok, 16, 2), args, data, hooks=[snaps])
    assert all(v in trainer.hooks for v in vs.values())
    trainer.train()
    states = [s for _, s in snaps.seen] + [{p: (v.lora_B.detach(), v.lora_R.detach()) for p, v in vs.items()}]
    assert [k for k, _ in snaps.seen] == list(range(total))
    frozen = [next(iter(vs.values())).frozen_columns(k, total) for k in range(total)]
    assert frozen == [0, 0, 1, 1, 2, 2, 2, 2]  # ⌊(k+1)/2.4⌋, capped at r
    for k, t in enumerate(frozen):
        for p in vs:
            (b0, s0), (b1, s1) = states[k][p], states[k + 1][p]
            assert torch.equal(b1[:, :t], b0[:, :t]), (k, p)
            assert t == r or (b1[:, t:] != b0[:, t:]).any(), (k, p)
            assert not torch.equal(s1, s0), (k, p)
    assert all(not v.lora_B.requires_grad for v in vs.values())
    assert lorakit.count_parameters(model)[0] == head + len(vs) * r * r  # only S (and the head) train


def test_merge_cycle_and_save_load_save(tmp_path):
    check_merge_cycle(lamda_mlp(), X)
    check_save_load_save(lamda_mlp(), mlp(), X, tmp_path)
    config = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAKIT_LAMDA"
    assert config["options"] == {"eta": 0.3, "schedule": "reference", "init": "kaiming"}


def test_mixed_batch():
    check_mixed_batch(lamda_mlp(("a", "b")), X)


def test_conv_layers(tmp_path):
    ids = inputs("convnet", batch=3, seq=9)

    def build():
        model = convnet()
        lorakit.inject(model, lamda(r=3, target_modules=["conv", "conv2d", "head"], init_lora_weights=False))
        perturb(model)
        return model
    model = build()
    model.train()
    model(**ids).sum().backward()
    with gradual_freeze(model, 3, 10):  # t = 1: B's first column (dim 1 of the (out, r, 1…) kernel) is frozen
        for v in variants(model).values():
            assert v.lora_B.grad[:, :1].abs().max() == 0 and v.lora_B.grad[:, 1:].abs().max() > 0
    model.eval()
    check_merge_cycle(model, ids)
    check_save_load_save(build(), convnet(), ids, tmp_path)


def test_planted_task():
    """A is frozen and random, so the row space of ΔW is fixed: r = 48 covers most of the 64 input directions.
    (The planted-task loop has no step hooks: B trains throughout.)"""
    r = 48
    before, after, n = planted_task(lamda(r=r, lora_alpha=r, target_modules=["fc1"]), lr=1e-2)
    assert n == r * r + 64 * r
    assert after <= 0.5 * before, (before, after)


def spread(seed, rank):
    """A 64×64 weight with `rank` strong directions plus weak noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, rank, generator=g) @ torch.randn(rank, 64, generator=g) + 0.05 * torch.randn(64, 64,
                                                                                                         generator=g)


def test_plus_plus_ranks_maximize_captured_energy():
    model = mlp()
    with torch.no_grad():
        model.fc1.weight.copy_(spread(0, 2))   # energy in 2 directions
        model.fc2.weight.copy_(spread(1, 12))  # energy spread over 12
    config = lamda(r=4)
    ranks = plus_plus_ranks(model, config)
    assert sum(ranks.values()) == 8 and ranks["fc2"] > ranks["fc1"] >= 1
    energy = {p: torch.linalg.svdvals(w).pow(2) / w.pow(2).sum()
              for p, w in (("fc1", model.fc1.weight), ("fc2", model.fc2.weight))}

    def captured(rs):
        return sum(energy[p][:k].sum().item() for p, k in rs.items())
    best = max(captured({"fc1": a, "fc2": 8 - a}) for a in range(1, 8))  # brute force over every split
    assert abs(captured(ranks) - best) <= 1e-6
    bounded = plus_plus_ranks(model, config, budget=10, r_min=3, r_max=6)
    assert sum(bounded.values()) == 10 and all(3 <= k <= 6 for k in bounded.values())
    best = max(captured({"fc1": a, "fc2": 10 - a}) for a in range(4, 7))  # both within [3, 6]
    assert abs(captured(bounded) - best) <= 1e-6
    lorakit.inject(model, lamda(r=4, rank_pattern=ranks))
    assert lorakit.count_parameters(model)[0] == sum(k * k + 64 * k for k in ranks.values())
    with pytest.raises(ConfigError, match="budget"):
        plus_plus_ranks(mlp(), config, budget=1)
    with pytest.raises(ConfigError, match="r_min"):
        plus_plus_ranks(mlp(), config, r_min=0)


def test_invalid_options():
    for options, word in (({"eta": 0}, "eta"), ({"schedule": "cosine"}, "schedule"), ({"init": "pissa"}, "init"),
                          ({"etaa": 1}, "etaa")):
        with pytest.raises(ConfigError, match=word):
            lamda(options=options)
    with pytest.raises(ConfigError, match="r=65"):
        lorakit.inject(mlp(), lamda(r=65, options={"init": "svd"}))
    lorakit.inject(mlp(), lamda(r=65))  # the kaiming init has no rank limit
    v = variants(lamda_mlp())["fc1"]
    with pytest.raises(ConfigError, match="total_steps"):
        v.frozen_columns(0, 0)


def test_resume_after_the_schedule_froze_b(tmp_path):
    """Checkpoints hold what the optimizer trains, B included after the schedule froze it: resume works and
    ends where an uninterrupted run ends."""
    from lorakit.data import TextDataset
    from lorakit.models import tiny_llama, train_tokenizer
    from lorakit.train.args import TrainingArguments
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    texts = [f"the {n} was {a}" for n in ("film", "plot") for a in ("good", "bad")]
    tok = train_tokenizer(texts, vocab_size=300)

    def build():
        m = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        lorakit.inject(m, lorakit.AdapterConfig(r=2, variant="lamda", task_type="SEQ_CLS", target_modules=["q_proj"]))
        return m

    class Crash:
        def before_optimizer_step(self, trainer):
            if trainer.step == 6:  # after checkpoint-6, written once B was frozen (t = ⌊k/2.4⌋ ≥ r from k = 5)
                raise KeyboardInterrupt

    def args(out):
        return TrainingArguments(output_dir=str(out), disable_tqdm=True, save_steps=3, max_steps=8,
                                 per_device_train_batch_size=2)
    data, task = TextDataset(texts, [0, 1, 0, 1]), make_task("classification", tok, 16, 2)
    whole = build()
    Trainer(whole, task, args(tmp_path / "a"), data).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(build(), task, args(tmp_path / "b"), data, hooks=[Crash()]).train()
    resumed = build()
    Trainer(resumed, task, args(tmp_path / "b"), data).train(resume=True)
    b = {n: p for n, p in resumed.named_parameters() if "lora_B" in n}
    assert b and not any(p.requires_grad for p in b.values())  # the schedule froze B by step 8
    for n, p in whole.named_parameters():
        if ".adapters." in n:
            assert torch.allclose(p, dict(resumed.named_parameters())[n], atol=1e-6), n
