"""GaLore (`lorakit.optim.galore`): Adam on rank-r projections of 2-D weight gradients, full-parameter training."""
import copy

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.optim import make_optimizer
from lorakit.train.args import TrainingArguments
from tests.contract import mlp
from tests.models import llama

pytestmark = pytest.mark.usefixtures("one_thread_module")
ARGS = TrainingArguments(learning_rate=1e-2)


def lm_batch(seed=0, batch=4, seq=12):
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids)


def test_state_shapes_have_r_in_place_of_min_m_n(tmp_path):
    model = llama()
    r = 8
    opt = make_optimizer("galore", model, ARGS, rank=r)
    assert all(p.requires_grad for p in model.parameters())
    model(**lm_batch()).loss.backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    projected = opt.param_groups[0]["params"]
    assert {names[id(p)].split(".")[-2] for p in projected} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"}
    assert len(projected) == 14 and opt.param_groups[0]["rank"] == r
    shapes = set()
    for p in projected:
        m, n = p.shape
        st = opt.state[p]
        want = (m, r) if m >= n else (r, n)
        assert st["exp_avg"].shape == want and st["exp_avg_sq"].shape == want, names[id(p)]
        assert st["projector"].shape == ((n, r) if m >= n else (m, r))
        assert all(t.shape != (m, n) for t in st.values() if torch.is_tensor(t))
        shapes.add((tuple(p.shape), want))
    assert ((128, 64), (128, 8)) in shapes and ((64, 128), (8, 128)) in shapes  # both orientations occur
    plain = opt.param_groups[1]["params"]  # embeddings, lm_head, norms: plain AdamW
    assert {names[id(p)] for p in plain} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    for p in plain:
        assert opt.state[p]["exp_avg"].shape == p.shape
    torch.save(opt.state_dict(), tmp_path / "opt.pt")  # checkpoints reload with weights_only
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))


@pytest.mark.parametrize("shape", [(48, 24), (24, 48)])
def test_one_step_matches_the_formulas(shape):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False))
    w0 = layer[0].weight.detach().clone().double()
    r, scale, lr, wd = 4, 0.5, 0.1, 0.01
    opt = make_optimizer("galore", layer, TrainingArguments(learning_rate=lr, weight_decay=wd), rank=r, scale=scale)
    layer(torch.randn(16, shape[1])).pow(2).sum().backward()
    g = layer[0].weight.grad.detach().double()
    opt.step()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    m, n = shape
    p = vh[:r].T if m >= n else u[:, :r]
    red = g @ p if m >= n else p.T @ g
    eps = ARGS.adam_epsilon
    normed = red / (red.abs() + eps)  # Adam's first bias-corrected step: m̂ = R, v̂ = R²
    back = scale * (normed @ p.T if m >= n else p @ normed)
    expected = (w0 - lr * back) * (1 - lr * wd)
    assert torch.allclose(layer[0].weight.detach().double(), expected, atol=1e-5)


def test_projector_refresh_every_T_steps():
    model = mlp()
    opt = make_optimizer("galore", model, ARGS, rank=4, update_proj_gap=3)
    w = model.fc1.weight
    g = torch.Generator().manual_seed(1)
    projectors, refreshed = [], []
    for step in range(8):
        loss = model(torch.randn(32, 64, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grad = w.grad.detach().clone()
        opt.step()
        proj = opt.state[w]["projector"]
        svd = torch.linalg.svd(grad, full_matrices=False)[2][:4].T  # m = n: P = V[:, :r]
        refreshed.append(bool(torch.allclose(proj.abs(), svd.abs(), atol=1e-4)))
        projectors.append(proj.clone())
    changed = [step for step in range(1, 8) if not torch.equal(projectors[step], projectors[step - 1])]
    assert changed == [3, 6]
    assert refreshed == [True, False, False, True, False, False, True, False]


def test_a_few_steps_reduce_the_loss_and_per_layer_matches():
    model = llama()
    twin = copy.deepcopy(model)
    opt = make_optimizer("galore", model, ARGS, rank=8, update_proj_gap=5, scale=1.0)
    opt2 = make_optimizer("galore", twin, ARGS, rank=8, update_proj_gap=5, scale=1.0, per_layer=True)
    batch = lm_batch()
    model.train(), twin.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        loss2 = twin(**batch).loss
        opt2.zero_grad()
        loss2.backward()  # each weight is updated inside backward, its gradient freed
        assert all(p.grad is None for p in twin.parameters())
        opt2.step()
        assert abs(loss2.item() - losses[-1]) < 1e-4
    assert losses[-1] < 0.8 * losses[0], losses
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    opt2.remove_hooks()


def test_options_errors():
    for bad, match in [(dict(rnk=4), "rnk"), (dict(rank=0), "rank"), (dict(update_proj_gap=1.5), "update_proj_gap"),
                       (dict(scale=-1), "scale"), (dict(per_layer="yes"), "per_layer"),
                       (dict(target_modules="attn"), "target_modules")]:
        with pytest.raises(ConfigError, match=match):
            make_optimizer("galore", mlp(), ARGS, **bad)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        make_optimizer("galore", mlp(), TrainingArguments(gradient_accumulation_steps=2), per_layer=True)
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="adapters"):
        make_optimizer("galore", model, ARGS)
    opt = make_optimizer("galore", mlp(), ARGS, rank=4, target_modules=["fc2"])
    assert opt.param_groups[0]["params"][0].shape == (64, 64) and len(opt.param_groups[0]["params"]) == 1


def test_trainer_run_resumes_to_the_same_weights(tmp_path):
    """Through the Trainer (`optim="galore"`): 6 straight steps equal 3 steps + checkpoint + resume to 6 (the
    checkpoint holds every parameter, the projected moments and the projectors)."""
    from lorakit.data import TextDataset
    from lorakit.models import tiny_llama, train_tokenizer
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    texts = [f"the film was {w}" for w in ["good", "bad", "great", "dull"] * 4]
    labels = [i % 2 for i in range(16)]
    tok = train_tokenizer(texts, vocab_size=120)

    def build(seed):
        return tiny_llama(len(tok), "classification", 2, seed, pad_token_id=tok.pad_token_id)

    def args(out, steps, save):
        return TrainingArguments(output_dir=str(out), disable_tqdm=True, save_steps=save, max_steps=steps,
                                 per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="constant",
                                 optim="galore", optim_args={"rank": 4, "update_proj_gap": 2})

    task, data = make_task("classification", tok, 16, 2), TextDataset(texts, labels)
    straight = build(0)
    Trainer(straight, task, args(tmp_path / "a", 6, 0), data).train()
    Trainer(build(0), task, args(tmp_path / "b", 3, 3), data).train()
    resumed = build(7)
    tr = Trainer(resumed, task, args(tmp_path / "b", 6, 0), data)
    tr.train(resume=True)
    assert tr.step == 6
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
