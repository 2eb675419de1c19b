"""DyLoRA: a LoRA trained at one sampled rank b per step (only component b trainable in frozen mode), scale α/b;
evaluable, mergeable and exportable at any rank ≤ r_max (`at_rank`)."""
import json
import os
from collections import Counter
from types import SimpleNamespace

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
from lorakit.variants import dylora
from lorakit.variants.dylora import at_rank, export_at_rank, resample, train_rank

from contract import (check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save,
                      check_vision, close, mlp, perturb, run, train_planted)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_module")
X = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))


def config(r=8, **kw):
    return lorakit.AdapterConfig(r=r, variant="dylora", target_modules=kw.pop("target_modules", ["fc1", "fc2"]), **kw)


def variants(model, name="default"):
    return {p: m.adapters[name] for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters}


def dy_mlp(names=("default",), **kw):
    model = mlp()
    for i, n in enumerate(names):
        torch.manual_seed(i)
        lorakit.inject(model, config(r=8 - 2 * i, lora_alpha=16 + i, **kw), n)
        perturb(model, n, seed=i)
    return model


def plain_lora_from(model, k, alpha, name="default"):
    """A fresh mlp with a plain LoRA (r=k, lora_alpha=alpha) holding the first k components of `model`'s adapter."""
    ref = mlp()
    lorakit.inject(ref, lorakit.AdapterConfig(r=k, lora_alpha=alpha, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for p, v in variants(model, name).items():
            w = variants(ref)[p]
            w.lora_A.copy_(v.lora_A[:k])
            w.lora_B.copy_(v.lora_B[:, :k])
    return ref


def test_parameter_count_and_init():
    r, alpha = 8, 16
    model = mlp()
    base = run(model, X)
    lorakit.inject(model, config(r=r, lora_alpha=alpha))
    assert lorakit.count_parameters(model)[0] == 2 * r * (64 + 64)  # r_max·(in + out) per layer, fc1 and fc2
    assert torch.equal(run(model, X), base)  # B = 0 ⇒ ΔW = 0 at every rank
    with at_rank(model, 3):
        assert torch.equal(run(model, X), base)
    for v in variants(model).values():
        assert v.lora_B.abs().max() == 0 and v.lora_A.abs().min() > 0
    model = mlp()
    lorakit.inject(model, config(r=r, init_lora_weights=False))
    assert not close(run(model, X), base)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_equals_lora_of_the_first_k_components_with_scale_alpha_over_k(k):
    alpha = 16
    model = dy_mlp()
    ref = plain_lora_from(model, k, alpha)  # plain LoRA scale α/k
    with at_rank(model, k):
        assert close(run(model, X), run(ref, X), tol=1e-6)
        for v in variants(model).values():
            a, b, s = v.factors()
            assert a.shape == (k, 64) and b.shape == (64, k) and s == pytest.approx(alpha / k)
    if k == 8:  # no rank set: r_max, a plain LoRA
        assert close(run(model, X), run(ref, X), tol=1e-6)
    # training at sampled rank b = k uses the same function
    model.train()
    model.lorakit_shared["default"].train_rank.fill_(k)
    with torch.no_grad():
        assert close(model(X), run(ref, X), tol=1e-6)


@pytest.mark.parametrize("frozen", [True, False])
def test_gradient_reaches_only_the_components_the_card_says(frozen):
    model = dy_mlp(options={"frozen": frozen})
    model.train()
    b = 5
    model.lorakit_shared["default"].train_rank.fill_(b)
    model(X).pow(2).sum().backward()
    for v in variants(model).values():
        rows = v.lora_A.grad.abs().sum(1)
        cols = v.lora_B.grad.abs().sum(0)
        trained = [b - 1] if frozen else list(range(b))
        for i in range(8):
            assert (rows[i] > 0) == (i in trained), (i, rows)
            assert (cols[i] > 0) == (i in trained), (i, cols)


def test_rank_sampling_uniform_deterministic_and_driven_by_the_hook():
    model = dy_mlp()
    state = model.lorakit_shared["default"]
    draws = [state.sample(t) for t in range(4000)]
    counts = Counter(draws)
    assert sorted(counts) == list(range(1, 9))
    assert all(abs(c / 4000 - 1 / 8) < 0.03 for c in counts.values()), counts
    again = dy_mlp().lorakit_shared["default"]
    assert draws == [again.sample(t) for t in range(4000)]
    assert train_rank(model) == state.sample(0)  # the first step's rank is drawn at construction
    state.after_optimizer_step(SimpleNamespace(step=6))
    assert train_rank(model) == state.sample(7)
    assert resample(model, 11) == train_rank(model) == state.sample(11)
    for seed in (5, 0):  # no seed option: the draws follow the torch seed the adapter is made under
        base = mlp()
        torch.manual_seed(seed)
        made_state = lorakit.inject(base, config(r=8)).lorakit_shared["default"]
        made = [made_state.sample(t) for t in range(50)]
        assert (made == draws[:50]) == (seed == 0)
    other = dy_mlp(options={"ranks": [2, 4, 8], "seed": 3}).lorakit_shared["default"]
    assert set(other.sample(t) for t in range(300)) == {2, 4, 8}
    assert [other.sample(t) for t in range(50)] != [state.sample(t) for t in range(50)]


CLASS_TEXTS = [f"the {n} was {a}" for n in ("film", "plot", "song", "cast") for a in ("good", "bad", "fine", "dull")]


def test_trainer_samples_one_rank_per_step_and_only_component_b_gets_gradient(tmp_path):
    tok = train_tokenizer(CLASS_TEXTS, vocab_size=300)
    model = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, variant="dylora", task_type="SEQ_CLS", init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
    vs = variants(model)
    state = model.lorakit_shared["default"]

    class Probe:
        def __init__(self):
            self.seen = []

        def before_optimizer_step(self, trainer):
            b = train_rank(model)
            rows = {p: (v.lora_A.grad.abs().sum(1) > 0).nonzero().flatten().tolist() for p, v in vs.items()}
            self.seen.append((trainer.step, b, rows))

    probe = Probe()
    total = 8
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=total,
                             per_device_train_batch_size=4, learning_rate=1e-2)
    data = TextDataset(CLASS_TEXTS, [i % 2 for i in range(len(CLASS_TEXTS))])
    trainer = Trainer(model, make_task("classification", tok, 16, 2), args, data, hooks=[probe])
    assert state in trainer.hooks
    trainer.train()
    assert [(t, b) for t, b, _ in probe.seen] == [(t, state.sample(t)) for t in range(total)]
    assert len({b for _, b, _ in probe.seen}) > 1
    for _, b, rows in probe.seen:
        assert all(r == [b - 1] for r in rows.values()), (b, rows)


def test_merge_cycle_at_default_and_chosen_rank_and_save_load_save(tmp_path):
    model = dy_mlp()
    check_merge_cycle(model, X)
    with at_rank(model, 3):
        check_merge_cycle(model, X)
    fresh = check_save_load_save(dy_mlp(), mlp(), X, tmp_path)
    with at_rank(fresh, 2):
        assert close(run(fresh, X), run(plain_lora_from(dy_mlp(), 2, 16), X), tol=1e-6)
    data = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORAKIT_DYLORA"
    assert data["options"] == {"frozen": True, "ranks": None, "seed": None}


def test_mixed_batch_and_rank_changes_reach_cached_stacks():
    model = dy_mlp(("a", "b"))
    check_mixed_batch(model, X)
    with at_rank(model, 2, "a"):
        check_mixed_batch(model, X)
    with at_rank(model, 3):  # every nested adapter in the model
        check_mixed_batch(model, X)


@pytest.mark.parametrize("k", [2, 8])
def test_export_at_rank_loads_in_peft(tmp_path, k):
    model = dy_mlp()
    with at_rank(model, k):
        check_export_loads_in_peft(model, mlp(), X, tmp_path / "a", r=k)
    assert dylora.get_rank(model) is None
    export_at_rank(model, tmp_path / "b", k)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == k


def test_vit_and_conv(tmp_path):
    check_vision(lorakit.AdapterConfig(r=4, variant="dylora", target_modules=["q_proj", "v_proj", "fc1"]), config(r=3, target_modules=["conv", "conv2d", "head"]), tmp_path, at_rank=2)


def test_planted_task_at_every_rank():
    model, x_test, y_test, before = train_planted(
        config(r=8, lora_alpha=8, target_modules=["fc1"], options={"frozen": False}), steps=400,
        hook=lambda m, t: resample(m, t))
    mse = {}
    with torch.no_grad():
        for k in range(1, 9):
            with at_rank(model, k):
                mse[k] = torch.nn.functional.mse_loss(model(x_test), y_test).item()
    print("dylora planted MSE before", before, "by rank", mse)
    assert mse[8] <= 0.5 * before and mse[4] <= 0.5 * before, (before, mse)
    assert mse[1] > mse[4]  # the planted ΔW has rank 4
    frozen, *_ = train_planted(config(r=8, lora_alpha=8, target_modules=["fc1"]), steps=400,
                               hook=lambda m, t: resample(m, t))
    with torch.no_grad(), at_rank(frozen, 8):
        after = torch.nn.functional.mse_loss(frozen(x_test), y_test).item()
    print("dylora frozen mode planted MSE at r_max", after)
    assert after <= 0.5 * before


def test_invalid_options():
    for options, word in [({"frozen": 1}, "frozen"), ({"ranks": []}, "ranks"), ({"ranks": [0, 2]}, "ranks"),
                          ({"seed": "x"}, "seed"), ({"rnaks": [1]}, "rnaks")]:
        with pytest.raises(ConfigError, match=word):
            lorakit.inject(mlp(), config(options=options))
    with pytest.raises(ConfigError, match="ranks"):
        lorakit.inject(mlp(), config(r=4, options={"ranks": [2, 8]}))
    model = dy_mlp()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="rank"):
            dylora.set_rank(model, bad)
    with pytest.raises(ConfigError, match="nested-rank"):
        dylora.set_rank(model, 2, "nope")
    plain = mlp()
    lorakit.inject(plain, lorakit.AdapterConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="nested-rank"):
        with at_rank(plain, 2):
            pass


def test_rank_pattern_layers_clip_the_rank(tmp_path):
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, config(r=8, lora_alpha=16, rank_pattern={"fc2": 4}, alpha_pattern={"fc2": 6}))
    perturb(model)
    vs = variants(model)
    with at_rank(model, 6):
        (_, _, s1), (a2, _, s2) = vs["fc1"].factors(), vs["fc2"].factors()
        assert s1 == pytest.approx(16 / 6) and a2.shape[0] == 4 and s2 == pytest.approx(6 / 4)
        check_export_loads_in_peft(model, mlp(), X, tmp_path / "a", r=6)
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["rank_pattern"] == {"fc2": 4}


def test_a_resumed_run_continues_with_the_rank_of_its_own_step(tmp_path):
    tok = train_tokenizer(CLASS_TEXTS, vocab_size=300)
    data = TextDataset(CLASS_TEXTS, [i % 2 for i in range(len(CLASS_TEXTS))])
    seen = []

    class Probe:
        def before_optimizer_step(self, trainer):
            seen.append((trainer.step, train_rank(trainer.model)))

    def trainer(max_steps):
        model = tiny_llama(len(tok), "classification", 2, seed=0, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        lorakit.inject(model, lorakit.AdapterConfig(r=8, variant="dylora", task_type="SEQ_CLS",
                                                    target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=3, max_steps=max_steps,
                                 per_device_train_batch_size=4, learning_rate=1e-2)
        return Trainer(model, make_task("classification", tok, 16, 2), args, data, hooks=[Probe()])

    trainer(3).train()
    resumed = trainer(6)
    resumed.train(resume=True)
    state = resumed.model.lorakit_shared["default"]
    assert seen == [(t, state.sample(t)) for t in range(6)]
