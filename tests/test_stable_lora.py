"""Stable-LoRA (`lorakit.optim.stable_lora`): shrink A until ‖A‖_F < (n/m)·‖B‖_F, then plain AdamW."""
import math

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.optim import make_optimizer
from lorakit.optim.stable_lora import StableLoRA
from lorakit.train.args import TrainingArguments
from tests.contract import mlp

pytestmark = pytest.mark.usefixtures("one_thread_module")
M, N, R = 32, 16, 4  # B: m×r, A: r×n, numel ratio = n/m = 0.5


def factors(c, seed=0):
    """A (r×n), B (m×r) with ‖A‖ = c·(n/m)·‖B‖ exactly (in float64)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(R, N, generator=g, dtype=torch.float64), torch.randn(M, R, generator=g, dtype=torch.float64)
    a *= c * (N / M) * b.norm() / a.norm()
    return torch.nn.Parameter(a), torch.nn.Parameter(b)


def frozen_adamw(a, b, ratio):
    """lr = 0, wd = 0: the AdamW part changes nothing, only the shrink acts."""
    opt = StableLoRA([a], [b], shrink_ratio=ratio, lr=0.0, weight_decay=0.0)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    return opt


@pytest.mark.parametrize("c", [1.0001, 0.9999])
def test_one_step_on_each_side_of_the_condition(c):
    a, b = factors(c)
    a0 = a.detach().clone()
    opt = frozen_adamw(a, b, 0.1)
    opt.step()
    if c > 1:   # ‖A‖ ≥ (n/m)‖B‖: shrink by (1 − λ), keep shrinking
        assert torch.allclose(a.detach(), 0.9 * a0, rtol=0, atol=1e-15) and opt.shrinking == [True]
    else:       # ‖A‖ < (n/m)‖B‖: the flag clears and A is left untouched
        assert torch.equal(a.detach(), a0) and opt.shrinking == [False]


def test_stops_exactly_at_the_condition_and_never_restarts():
    c, lam = 1.05, 0.01
    a, b = factors(c)
    a0 = a.detach().clone()
    opt = frozen_adamw(a, b, lam)
    expected = math.ceil(math.log(1 / c) / math.log(1 - lam))  # shrinks until (1−λ)^k·c < 1: k = 5
    assert expected == 5
    shrinks = 0
    for step in range(20):
        before = a.detach().clone()
        opt.step()
        if not torch.equal(a.detach(), before):
            shrinks += 1
            assert opt.shrinking == [True]
        if step == expected:  # the check after the 5th shrink sees ‖A‖ < (n/m)‖B‖ and clears the flag
            assert opt.shrinking == [False]
    assert shrinks == expected
    assert torch.allclose(a.detach(), (1 - lam) ** expected * a0, rtol=1e-12, atol=0)
    assert a.norm() < (N / M) * b.norm() <= (1 - lam) ** (expected - 1) * c * (N / M) * b.norm()
    with torch.no_grad():   # ‖A‖ grows back above the threshold: the one-way flag stays cleared
        a.mul_(10)
    big = a.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), big) and opt.shrinking == [False]


def injected_mlp(seed=0):
    model = mlp(seed)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    return model


def test_factory_pairs_by_module_and_flags_survive_state_dict(tmp_path):
    model = injected_mlp()
    model.fc2.weight.requires_grad_(True)  # an extra trainable tensor goes to group 2 (AdamW, no shrink)
    opt = make_optimizer("stable_lora", model, TrainingArguments(learning_rate=1e-3), shrink_ratio=0.2)
    assert [p is model.fc1.adapters["default"].lora_A for p in opt.param_groups[0]["params"]] == [True, False]
    for a, b in zip(opt.param_groups[0]["params"], opt.param_groups[1]["params"]):
        owner = [m for m in model.modules() if isinstance(m, lorakit.layers.AdaptedLayer)
                 and m.adapters["default"].lora_A is a][0]
        assert owner.adapters["default"].lora_B is b
    assert opt.param_groups[2]["params"] == [model.fc2.base_layer.weight]
    with torch.no_grad():  # fc1: B large (no shrink); fc2: B = 0 (shrink)
        model.fc1.adapters["default"].lora_B.normal_(0, 10)
    x = torch.randn(8, 64)
    model(x).pow(2).mean().backward()
    opt.step()
    assert opt.shrinking == [False, True]
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = make_optimizer("stable_lora", model, TrainingArguments(learning_rate=1e-3), shrink_ratio=0.2)
    assert fresh.shrinking == [True, True]
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert fresh.shrinking == [False, True]


def test_training_reduces_loss_and_shrinks_a():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g)
    teacher = torch.nn.Linear(64, 64)
    y = teacher(x).detach()
    model = injected_mlp()
    opt = make_optimizer("stable_lora", model, TrainingArguments(learning_rate=1e-2), shrink_ratio=0.05)
    losses, flags = [], []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        flags.append(opt.shrinking)
    assert losses[-1] < 0.7 * losses[0]
    assert flags[0] == [True, True]  # B starts at 0: A is shrunk at first ...
    assert flags[-1] == [False, False]  # ... until B has grown enough (n = m: ‖A‖ < ‖B‖)


def test_options_errors():
    args = TrainingArguments()
    with pytest.raises(ConfigError, match="shrink_rate"):
        make_optimizer("stable_lora", injected_mlp(), args, shrink_rate=0.1)
    with pytest.raises(ConfigError, match="shrink_ratio"):
        make_optimizer("stable_lora", injected_mlp(), args, shrink_ratio=1.5)
    with pytest.raises(ConfigError, match="lora_A"):
        make_optimizer("stable_lora", mlp(), args)


def test_trainer_run_resumes_to_the_same_weights(tmp_path):
    """Through the Trainer (`optim="stable_lora"`): 6 straight steps equal 3 steps + checkpoint + resume to 6."""
    from lorakit.data import TextDataset
    from lorakit.models import tiny_llama, train_tokenizer
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    texts = [f"the film was {w}" for w in ["good", "bad", "great", "dull"] * 4]
    labels = [i % 2 for i in range(16)]
    tok = train_tokenizer(texts, vocab_size=120)

    def build(seed):
        model = tiny_llama(len(tok), "classification", 2, seed, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"))
        with torch.no_grad():  # one module starts with a large B: it stops shrinking at once
            model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.normal_(0, 1)
        return model

    def args(out, steps, save):
        return TrainingArguments(output_dir=str(out), disable_tqdm=True, save_steps=save, max_steps=steps,
                                 per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                                 optim="stable_lora", optim_args={"shrink_ratio": 0.05})

    task, data = make_task("classification", tok, 16, 2), TextDataset(texts, labels)
    straight = build(0)
    first = Trainer(straight, task, args(tmp_path / "a", 6, 0), data)
    first.train()
    assert first.optimizer.shrinking == [False, True, True, True]  # that one stopped, the others still shrink
    Trainer(build(0), task, args(tmp_path / "b", 3, 3), data).train()
    resumed = build(0)
    tr = Trainer(resumed, task, args(tmp_path / "b", 6, 0), data)
    tr.train(resume=True)
    assert tr.optimizer.shrinking == first.optimizer.shrinking
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
