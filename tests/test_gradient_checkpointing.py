"""Gradient checkpointing with adapters: gradients equal the non-checkpointed ones, and each recomputation in
backward uses the routing (per-row names, token masks) of its own forward, even after `route(...)` has closed.

Every model is the tiny seeded Llama (hidden 64, 2 layers) in train mode (transformers checkpoints only then), with
adapters whose B is drawn from a seeded generator (a zero B would make every comparison pass trivially).
"""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit
from lorakit import routing as routing_mod
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread_module")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
NAMES = ["a", "__base__", "b", "a"]
OTHER = ["b", "b", "__base__", "a"]
IDS = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(3))
IDS2 = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(4))
MASK = torch.rand(4, 9, generator=torch.Generator().manual_seed(5)) < 0.4  # True = image token
REENTRANT = [None, True, False]  # None: transformers' default kwargs


def randomize_b(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def enable_checkpointing(model, reentrant):
    kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 calls it a deprecated alias
        model.gradient_checkpointing_enable(**kwargs)


def build(variant="lora", checkpointing=False, reentrant=None, enable_first=False, dropout=0.0, **options):
    """Two adapters "a" and "b" of `variant` on q/v/o/down, trainable, model in train mode."""
    model = llama(eos_token_id=None, pad_token_id=0).train()
    if checkpointing and enable_first:
        enable_checkpointing(model, reentrant)
    for name in "ab":
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, variant=variant, target_modules=TARGETS,
                                                    lora_dropout=dropout, options=options), name)
    randomize_b(model)
    lorakit.mark_trainable(model, ["a", "b"])
    if checkpointing and not enable_first:
        enable_checkpointing(model, reentrant)
    return model


def grads(model):
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got, ref, rtol=1e-5):
    assert got.keys() == ref.keys()
    for n, g in ref.items():
        assert g is not None and g.abs().max() > 0, f"{n}: the reference has all zero (the test would be trivial)"
        assert got[n] is not None, f"{n}: no gradient with checkpointing"
        assert (got[n] - g).abs().max() <= rtol * g.abs().max(), n


def assert_checkpointing_changes_nothing(run, variant, reentrant, calls):
    """`run(model)` → (loss, grads) equal with and without checkpointing, and some layer was checkpointed."""
    ref_loss, ref = run(build(variant))
    loss, got = run(build(variant, True, reentrant))
    assert calls, "no layer was checkpointed"
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert_same(got, ref)


@pytest.fixture
def calls(monkeypatch):
    """Counts the checkpointed block calls (so a test cannot pass because nothing was checkpointed)."""
    seen = []
    real = routing_mod._PinningCheckpoint.__call__
    monkeypatch.setattr(routing_mod._PinningCheckpoint, "__call__", lambda self, *a, **k: seen.append(1) or
                        real(self, *a, **k))
    return seen


def routed_loss(model, names, ids, **masks):
    with lorakit.route(model, names, token_masks=masks or None):
        return model(ids, labels=ids).loss


@pytest.mark.parametrize("reentrant", REENTRANT)
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("when", ["after", "inside"])
def test_mixed_batch_gradients_equal_without_checkpointing(variant, reentrant, when, calls):
    """Backward after leaving `route` (or inside it) recomputes each layer with the routing of its forward."""
    def run(model):
        with lorakit.route(model, NAMES):
            loss = model(IDS, labels=IDS).loss
            if when == "inside":
                loss.backward()
        if when == "after":
            loss.backward()
        return loss.item(), grads(model)

    assert_checkpointing_changes_nothing(run, variant, reentrant, calls)


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_two_routed_forwards_then_one_backward(reentrant, calls):
    """loss1 + loss2 from forwards with different routings: each recomputation uses its own forward's routing."""
    def run(model):
        loss = routed_loss(model, NAMES, IDS) + routed_loss(model, OTHER, IDS2)
        loss.backward()
        return loss.item(), grads(model)

    assert_checkpointing_changes_nothing(run, "dora", reentrant, calls)


@pytest.mark.parametrize("reentrant", [True, False])
def test_unrouted_forward_then_backward_inside_another_route(reentrant):
    """The state is captured at every forward: a default-routed loss backpropagated inside a route stays default."""
    def run(model):
        lorakit.set_active(model, ["a", "b"])
        loss = model(IDS, labels=IDS).loss
        with lorakit.route(model, OTHER):
            loss.backward()
        return grads(model)

    assert_same(run(build(checkpointing=True, reentrant=reentrant)), run(build()))


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_enable_before_inject(reentrant, calls):
    def run(model):
        routed_loss(model, NAMES, IDS).backward()
        return grads(model)

    got = run(build(checkpointing=True, reentrant=reentrant, enable_first=True))
    assert calls
    assert_same(got, run(build()))


@pytest.mark.parametrize("reentrant", [True, False])
def test_dora_with_dropout(reentrant):
    """Dropout masks are replayed (checkpoint restores the RNG) and DoRA recomputes W·dropout(x) in the block."""
    def run(model):
        torch.manual_seed(11)
        routed_loss(model, NAMES, IDS).backward()
        return grads(model)

    assert_same(run(build("dora", True, reentrant, dropout=0.2)), run(build("dora", dropout=0.2)))


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_mm_lora_token_masks_with_per_row_names(reentrant, calls):
    """MM-LoRA reads the modality mask from the routing; without it the recomputation would raise RoutingError."""
    def run(model):
        loss = routed_loss(model, NAMES, IDS, image=MASK) + routed_loss(model, OTHER, IDS2, image=~MASK)
        loss.backward()
        return loss.item(), grads(model)

    assert_checkpointing_changes_nothing(run, "mm_lora", reentrant, calls)


@pytest.mark.parametrize("inputs", ["inputs_embeds", "no_input_hook"])
def test_reentrant_gives_adapters_gradients_when_no_block_input_requires_grad(inputs):
    """With a frozen embedding the first block's input needs no gradient: reentrant checkpointing would give the
    adapters inside no gradient at all (transformers' embedding hook misses `inputs_embeds`)."""
    def run(model):
        if inputs == "no_input_hook" and model.is_gradient_checkpointing:
            model.disable_input_require_grads()
        embeds = model.get_input_embeddings()(IDS).detach()
        with lorakit.route(model, NAMES):
            kw = {"inputs_embeds": embeds} if inputs == "inputs_embeds" else {"input_ids": IDS}
            loss = model(**kw, labels=IDS).loss
        loss.backward()
        return grads(model)

    assert_same(run(build(checkpointing=True, reentrant=True)), run(build()))


class Block(nn.Module):
    """Two projections of the block's own input: the plan's gather cache would hit in the recomputation."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.q(x) * torch.tanh(self.k(x))


class Stack(nn.Module):
    def __init__(self, mode=None):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.mode = mode  # None: no checkpointing; else use_reentrant

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.mode is None else checkpoint(routing_mod.pin_routing(block), x,
                                                              use_reentrant=self.mode)
        return x


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("when", ["after", "inside"])
def test_torch_checkpoint_used_directly_with_pin_routing(reentrant, when):
    def run(mode):
        torch.manual_seed(0)
        model = Stack(mode)
        for name in "ab":
            lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_alpha=4, target_modules=["q", "k"]), name)
        randomize_b(model)
        x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with lorakit.route(model, NAMES):
            out = model(x).square().sum()
            if when == "inside":
                out.backward()
        if when == "after":
            out.backward()
        return grads(model)

    assert_same(run(reentrant), run(None))


def test_unload_removes_the_hooks():
    model = build(checkpointing=True)
    layer = model.model.layers[0]
    model(IDS)
    assert isinstance(layer._gradient_checkpointing_func, routing_mod._PinningCheckpoint)
    lorakit.unload(model)
    assert not isinstance(layer._gradient_checkpointing_func, routing_mod._PinningCheckpoint)
    assert all(h is not routing_mod._wrap_checkpoint_func
               for m in model.modules() for h in m._forward_pre_hooks.values())


def test_training_with_gradient_checkpointing_gives_the_same_losses(tmp_path, calls):
    """`lorakit.train` with `gradient_checkpointing=True` logs the same losses and gradient norms, and saves the same
    adapter, as without it."""
    from safetensors.torch import load_file

    from lorakit.train.run import train
    from test_loraprune import tiny_run_config

    logged, saved = {}, {}
    for on in (False, True):
        (tmp_path / str(on)).mkdir()
        train(tiny_run_config(tmp_path / str(on), gradient_checkpointing=on))
        out = tmp_path / str(on) / "run"
        logged[on] = [(r["loss"], r["grad_norm"]) for r in _records(out / "metrics.jsonl") if "loss" in r]
        saved[on] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert calls, "training did not checkpoint"
    assert len(logged[True]) == 3
    assert torch.tensor(logged[True]) == pytest.approx(torch.tensor(logged[False]), rel=1e-5)
    assert_same(saved[True], saved[False])


def _records(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
