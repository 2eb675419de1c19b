"""LISA (`lorakit.optim.lisa`): γ sampled transformer blocks trainable every K steps, the rest always trainable."""
import types

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.optim import make_optimizer
from lorakit.optim.lisa import find_blocks
from lorakit.train.args import TrainingArguments
from tests.models import gpt2, llama

pytestmark = pytest.mark.usefixtures("one_thread_module")
ARGS = TrainingArguments(learning_rate=5e-3, seed=3)
LAYERS = 6


def model6():
    return llama(num_hidden_layers=LAYERS)


def lm_batch(seed=0, batch=4, seq=12):
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids)


def trainable_blocks(model):
    return [i for i, layer in enumerate(model.model.layers) if all(p.requires_grad for p in layer.parameters())]


def frozen_blocks(model):
    return [i for i, layer in enumerate(model.model.layers) if not any(p.requires_grad for p in layer.parameters())]


def always_on(model):
    return [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight]


def run(model, opt, steps, record=None):
    losses = []
    for _ in range(steps):
        if record is not None:
            record.append(trainable_blocks(model))
        loss = model(**lm_batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_blocks_found():
    assert [n for n, _ in find_blocks(model6())] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert [n for n, _ in find_blocks(gpt2())] == ["transformer.h.0", "transformer.h.1"]
    assert [n for n, _ in find_blocks(model6(), ["model.layers"])][-1] == "model.layers.5"


def test_gamma_blocks_trainable_resampled_every_K_steps_seeded():
    gamma, k = 2, 3
    model = model6()
    opt = make_optimizer("lisa", model, ARGS, activated_layers=gamma, interval_steps=k)
    model.train()
    record = []
    run(model, opt, 4 * k, record)
    for step, active in enumerate(record):
        assert len(active) == gamma and len(frozen_blocks(model)) == LAYERS - gamma
        assert active == opt.sample(step // k)  # constant within a period, resampled at multiples of K
    periods = [record[i * k] for i in range(4)]
    assert len({tuple(p) for p in periods}) > 1
    assert all(p.requires_grad for p in always_on(model))
    # the same seed gives the same sequence; another seed another one
    again = make_optimizer("lisa", model6(), ARGS, activated_layers=gamma, interval_steps=k)
    assert [again.sample(p) for p in range(10)] == [opt.sample(p) for p in range(10)]
    other = make_optimizer("lisa", model6(), ARGS, activated_layers=gamma, interval_steps=k, seed=4)
    assert [other.sample(p) for p in range(10)] != [opt.sample(p) for p in range(10)]


def test_gradients_and_state_follow_the_active_blocks():
    model = model6()
    opt = make_optimizer("lisa", model, ARGS, activated_layers=1, interval_steps=2)
    model.train()
    first = opt.active
    model(**lm_batch()).loss.backward()
    for i, layer in enumerate(model.model.layers):
        assert all((p.grad is not None) == (i in first) for p in layer.parameters())
    assert all(p.grad is not None for p in always_on(model))
    opt.step()
    run(model, opt, 1)  # completes period 0: the set switches
    second = opt.active
    period_ends = 2
    while second == first:  # (seeded: find a switch that changes the block)
        run(model, opt, 2)
        period_ends += 2
        second = opt.active
    for p in model.model.layers[first[0]].parameters():
        assert p not in opt.state and p.grad is None and not p.requires_grad  # dropped: fresh moments next time
    run(model, opt, 1)
    for p in model.model.layers[second[0]].parameters():
        assert int(opt.state[p]["step"]) == 1  # newly active: fresh state
    assert int(opt.state[model.lm_head.weight]["step"]) == period_ends + 1  # always-on state is kept


def test_a_few_steps_reduce_the_loss_and_resume(tmp_path):
    model = model6()
    opt = make_optimizer("lisa", model, ARGS, activated_layers=2, interval_steps=4)
    model.train()
    losses = run(model, opt, 10)
    assert losses[-1] < 0.8 * losses[0], losses
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh_model = model6()
    fresh_model.load_state_dict(model.state_dict())
    fresh = make_optimizer("lisa", fresh_model, ARGS, activated_layers=2, interval_steps=4)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert fresh.active == opt.active == opt.sample(2) and trainable_blocks(fresh_model) == opt.active
    assert len(fresh.param_groups) == 1 + LAYERS
    # the trainer's hook only re-syncs when its step count disagrees
    fresh.before_optimizer_step(types.SimpleNamespace(step=10))
    assert fresh.active == opt.sample(2)
    fresh.before_optimizer_step(types.SimpleNamespace(step=13))
    assert fresh.active == opt.sample(3) and trainable_blocks(fresh_model) == opt.sample(3)


def test_options_errors():
    for bad, match in [(dict(activated=1), "activated"), (dict(activated_layers=LAYERS + 1), "activated_layers"),
                       (dict(activated_layers=0), "activated_layers"), (dict(interval_steps=0), "interval_steps"),
                       (dict(layers=["model.nope"]), "layers"), (dict(layers=["lm_head"]), "layers")]:
        with pytest.raises(ConfigError, match=match):
            make_optimizer("lisa", model6(), ARGS, **bad)
    model = model6()
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="adapters"):
        make_optimizer("lisa", model, ARGS)


def test_trainer_run_resumes_to_the_same_weights(tmp_path):
    """Through the Trainer (`optim="lisa"`): 6 straight steps equal 3 steps + checkpoint + resume to 6 (the
    checkpoint holds every parameter, the moments of the active blocks and the active set)."""
    from lorakit.data import TextDataset
    from lorakit.models import tiny_llama, train_tokenizer
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    texts = [f"the film was {w}" for w in ["good", "bad", "great", "dull"] * 4]
    labels = [i % 2 for i in range(16)]
    tok = train_tokenizer(texts, vocab_size=120)

    def build(seed):
        return tiny_llama(len(tok), "classification", 2, seed, num_hidden_layers=4, pad_token_id=tok.pad_token_id)

    def args(out, steps, save):
        return TrainingArguments(output_dir=str(out), disable_tqdm=True, save_steps=save, max_steps=steps,
                                 per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="constant",
                                 optim="lisa", optim_args={"activated_layers": 1, "interval_steps": 2})

    task, data = make_task("classification", tok, 16, 2), TextDataset(texts, labels)
    straight = build(0)
    Trainer(straight, task, args(tmp_path / "a", 6, 0), data).train()
    Trainer(build(0), task, args(tmp_path / "b", 3, 3), data).train()
    resumed = build(7)  # other weights: the checkpoint restores all of them
    tr = Trainer(resumed, task, args(tmp_path / "b", 6, 0), data)
    tr.train(resume=True)
    assert tr.step == 6 and tr.optimizer.active == tr.optimizer.sample(3)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
