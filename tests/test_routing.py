"""Mixed batches: each row equals running it alone with its adapter; gradients stay in their rows."""

import pytest
import torch

import lorakit
from lorakit.routing import Routing
from models import llama


def tiny_llama():
    return llama(eos_token_id=None, pad_token_id=0)  # no EOS: generations run to max_new_tokens


def perturb(model, scale=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * scale)


def model_with_adapters(**variants):
    """A tiny Llama with one adapter per keyword: name=(variant, r, use_rslora)."""
    model = tiny_llama()
    for i, (name, (variant, r, rs)) in enumerate(variants.items()):
        torch.manual_seed(100 + i)
        cfg = lorakit.AdapterConfig(r=r, lora_alpha=2 * r, variant=variant, use_rslora=rs, init_lora_weights=False,
                                    target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"])
        lorakit.inject(model, cfg, name)
    perturb(model)
    return model


ADAPTERS = dict(a=("lora", 4, False), b=("lora", 8, True), c=("dora", 2, False), d=("dora", 6, True))
NAMES = ["c", "a", "__base__", "b", "a", "d", "c", "__base__"]


def alone(model, name, ids):
    if name == "__base__":
        with lorakit.disabled(model):
            return model(ids).logits
    lorakit.set_active(model, [name])
    return model(ids).logits


def tol(ref):
    return 1e-5 * max(1.0, ref.abs().max().item())


def test_mixed_batch_forward_equals_each_row_alone():
    model = model_with_adapters(**ADAPTERS)
    ids = torch.randint(0, 128, (len(NAMES), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lorakit.route(model, NAMES):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            ref = alone(model, name, ids[i:i + 1])
            assert (mixed[i:i + 1] - ref).abs().max() <= tol(ref), name
        base = alone(model, "__base__", ids[:1])
        assert (alone(model, "a", ids[:1]) - base).abs().max() > 1e-3  # adapters really change the output


def test_mixed_batch_greedy_generate():
    model = model_with_adapters(**ADAPTERS)
    prompt = torch.randint(1, 128, (len(NAMES), 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lorakit.route(model, NAMES):
        mixed = model.generate(prompt, **kw)
    outs = set()
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with lorakit.disabled(model):
                    ref = model.generate(prompt[i:i + 1], **kw)
            else:
                lorakit.set_active(model, [name])
                ref = model.generate(prompt[i:i + 1], **kw)
            assert torch.equal(mixed[i:i + 1], ref), name
            outs.add(tuple(ref[0, 5:].tolist()))
    assert len(outs) > 1  # different adapters generate different continuations


def test_gradients_reach_each_adapter_only_from_its_rows():
    model = model_with_adapters(a=("lora", 4, False), c=("dora", 2, False))
    lorakit.mark_trainable(model, ["a", "c"])
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(2))
    names = ["a", "__base__", "c", "a"]

    def grads(rows, route_names):
        model.zero_grad()
        with lorakit.route(model, route_names):
            model(ids[rows]).logits.sum().backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters() if p.requires_grad}

    mixed = grads([0, 1, 2, 3], names)
    only_a = grads([0, 3], ["a", "a"])
    only_c = grads([2], ["c"])
    for n, g in mixed.items():
        ref = only_a[n] if ".adapters.a." in n else only_c[n]
        assert torch.allclose(g, ref, atol=1e-6, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for n, g in mixed.items() if ".adapters.a." in n)
    assert any(g.abs().sum() > 0 for n, g in mixed.items() if ".adapters.c." in n)


def test_routing_plan_built_once_per_forward_and_true_rank_matmuls(monkeypatch):
    monkeypatch.setenv("LORAKIT_KERNELS", "eager")  # the eager path's matmuls (the fused kernels: test_kernels.py)
    model = model_with_adapters(a=("lora", 4, False), b=("lora", 8, False))
    built = []
    original = Routing._build_plan
    monkeypatch.setattr(Routing, "_build_plan", lambda self, *a: built.append(a) or original(self, *a))
    ranks = []
    from lorakit.kinds import LinearKind
    down = LinearKind.down
    monkeypatch.setattr(LinearKind, "down", lambda self, x, a: ranks.append((a.shape[0], x.shape[0])) or down(self, x, a))
    ids = torch.randint(0, 128, (5, 4))
    with torch.no_grad(), lorakit.route(model, ["a", "b", "a", "__base__", "b"]):
        model(ids)
        assert len(built) == 1  # one plan for the whole forward, shared by every layer
        model(ids)
        assert len(built) == 1  # and reused for the next forward of the same shape
    # every down-projection ran at its adapter's own rank on exactly that adapter's rows
    assert set(ranks) == {(4, 2), (8, 2)}


def test_row_multiple_maps_to_interleaved_names():
    r = Routing(["a", "__base__", "b"])
    plan = r.plan(6, torch.device("cpu"))
    assert plan.order.tolist() == [0, 1, 4, 5]
    assert plan.segments == [("a", 0, 2), ("b", 2, 4)]
    assert not plan.identity
    assert r.plan(3, torch.device("cpu")).identity is False
    assert Routing(["a", "a", "b"]).plan(3, torch.device("cpu")).identity


def test_routing_refused_when_merged():
    model = model_with_adapters(a=("lora", 4, False))
    lorakit.merge(model)
    with pytest.raises(lorakit.errors.RoutingError):
        with lorakit.route(model, ["a"]):
            pass


def test_gradient_checkpointing_recompute_uses_the_same_routing():
    names = ["a", "c", "__base__", "a"]
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))

    def grads(checkpointing):
        model = model_with_adapters(a=("lora", 4, False), c=("dora", 2, False)).train()
        lorakit.mark_trainable(model, ["a", "c"])
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        with lorakit.route(model, names):
            model(ids, labels=ids).loss.backward()  # backward inside the context: recompute sees the routing
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for n in plain:
        assert torch.allclose(plain[n], recomputed[n], atol=1e-6, rtol=1e-4), n


GROUPED = sorted(NAMES)  # rows already grouped by adapter: the routed path works on views, in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("active", [["a", "c", "d"], ["c"], ["a"]])
def test_inference_fast_paths_equal_the_autograd_path(dtype, active):
    """no_grad / inference_mode accumulate in place (fused LoRA addmm, DoRA rescaled in place);
    results equal the autograd path. Several active adapters, DoRA among them, each see the base output."""
    model = model_with_adapters(**ADAPTERS).to(dtype)
    ids = torch.randint(0, 128, (len(NAMES), 5), generator=torch.Generator().manual_seed(4))
    lorakit.set_active(model, active)
    tol_rel = 1e-5 if dtype == torch.float32 else 2e-2
    for run in (lambda: model(ids).logits, lambda: _routed(model, ids, NAMES), lambda: _routed(model, ids, GROUPED)):
        ref = run().detach()
        with torch.no_grad():
            fast = run()
        with torch.inference_mode():
            inference = run()
        for out in (fast, inference):
            assert (out.float() - ref.float()).abs().max() <= tol_rel * max(1.0, ref.float().abs().max().item())


def _routed(model, ids, names):
    with lorakit.route(model, names):
        return model(ids).logits


def test_same_rank_adapters_run_batched_and_equal_each_row_alone(monkeypatch):
    """Several same-rank LoRA adapters with equal row counts run as one bmm pair per layer; every row
    still equals its adapter alone, grouped or shuffled, fp32; stacks follow in-place factor changes."""
    from lorakit import stacked

    monkeypatch.setenv("LORAKIT_KERNELS", "eager")  # the bmm path; the fused kernels: test_kernels.py
    model = model_with_adapters(**{f"s{i}": ("lora", 4, i % 2 == 0) for i in range(4)}, big=("lora", 8, False))
    names = ["s0", "s1", "s2", "s3", "big", "__base__"] * 2
    calls = []
    real = stacked.add_run_
    monkeypatch.setattr(stacked, "add_run_", lambda out, xs, plan, run, st: calls.append(len(run)) or
                        real(out, xs, plan, run, st))
    ids = torch.randint(0, 128, (len(names), 5), generator=torch.Generator().manual_seed(6))
    interleaved = ["s0", "big", "s1", "s2", "s3", "__base__"] * 2  # ranks mixed: the plan regroups them
    for order in (names, sorted(names), interleaved):
        calls.clear()
        with torch.no_grad(), lorakit.route(model, order):
            mixed = model(ids).logits
        assert calls and set(calls) == {4}  # the four rank-4 adapters batched in every layer; "big" alone
        with torch.no_grad():
            for i, name in enumerate(order):
                ref = alone(model, name, ids[i:i + 1])
                assert (mixed[i:i + 1] - ref).abs().max() <= tol(ref), name
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["s2"].lora_B.mul_(3.0)  # in-place change: the cached stack must be rebuilt
        with lorakit.route(model, names):
            mixed = model(ids).logits
        ref = alone(model, "s2", ids[2:3])
    assert (mixed[2:3] - ref).abs().max() <= tol(ref)


def test_beam_search_rows_keep_their_adapter():
    """generate() expands each row into num_beams rows (repeat-interleaved): each keeps its adapter."""
    model = model_with_adapters(a=("lora", 4, False), c=("dora", 2, False))
    names = ["c", "__base__", "a"]
    prompt = torch.randint(1, 128, (3, 4), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lorakit.route(model, names):
        mixed = model.generate(prompt, **kw)
    with torch.no_grad():
        for i, name in enumerate(names):
            with lorakit.route(model, [name]):
                ref = model.generate(prompt[i:i + 1], **kw)
            assert torch.equal(mixed[i:i + 1], ref), name
