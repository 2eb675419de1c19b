"""RecLoRA: a bank of meta-LoRAs per layer mixed per user by a gate reading the routing's condition vectors."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.compose import merge_adapters
from lorakit.errors import ConfigError, MergeError, RoutingError, TargetError, UnsupportedFeatureError
from lorakit.routing import Routing

from contract import close, injected, mlp, perturb
from models import convnet, llama

D_U = 16
G = torch.Generator().manual_seed(0)
X = torch.randn(4, 5, 64, generator=G)  # (batch, seq, features)
U = torch.randn(4, D_U, generator=G)  # one user per sequence


def rec(r=4, targets=("fc1", "fc2"), alpha=8, **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=alpha, variant="reclora", target_modules=list(targets),
                                 options={"user_dim": D_U, **options})


def routed(model, x, u, grad=False, **route):
    with lorakit.route(model, conditions={"user": u}, **route), torch.set_grad_enabled(grad):
        return model(x)


def gate_by_hand(v, u):
    """The card's gate from the module's parameters: softmax(fc2(ReLU(fc1(LN(u)))) / τ) (eval: no dropout)."""
    g = v.reclora_gate
    h = F.layer_norm(u, (u.shape[-1],), g.norm.weight, g.norm.bias, g.norm.eps)
    logits = F.relu(h @ g.fc1.weight.T + g.fc1.bias) @ g.fc2.weight.T + g.fc2.bias
    return torch.softmax(logits / v.opts.temperature, -1) if v.opts.softmax else logits


def reference(model, x, u, name="default", product_of_sums=True):
    """Per sample: A_p = Σ w_k A_k, B_p = Σ w_k B_k, y = W x + s·B_p A_p x on fc1 and fc2 (u (batch, d_u) or one row
    per token of x (batch, seq, ·)); `product_of_sums=False` gives Σ w_k B_k A_k instead, for contrast."""
    def layer(module, h):
        v = module.adapters[name]
        n, r = v.opts.bank_size, v.r
        a = v.reclora_A.view(n, r, -1)  # A_k = rows [k·r, (k+1)·r)
        b = torch.stack([v.reclora_B[:, k * r:(k + 1) * r] for k in range(n)])  # B_k = columns [k·r, (k+1)·r)
        w = gate_by_hand(v, u)
        if u.shape[0] == h.shape[0]:  # per sequence
            w = w[:, None, :].expand(*h.shape[:-1], n)
        else:  # per token
            w = w.view(*h.shape[:-1], n)
        out = module.base_layer(h)
        for i in range(h.shape[0]):
            for t in range(h.shape[1]):
                wk = w[i, t]
                if product_of_sums:
                    dw = torch.einsum("k,kor->or", wk, b) @ torch.einsum("k,kri->ri", wk, a)
                else:
                    dw = torch.einsum("k,kor,kri->oi", wk, b, a)
                out[i, t] = out[i, t] + v.scale * dw @ h[i, t]
        return out
    with torch.no_grad():
        return layer(model.fc2, F.gelu(layer(model.fc1, x)))


def test_shapes_init_and_trainable_count():
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, rec(r=4, bank_size=3))
    v = model.fc1.adapters["default"]
    assert v.reclora_A.shape == (12, 64) and v.reclora_B.shape == (64, 12)
    a, b = v.bank()
    assert a.shape == (3, 4, 64) and b.shape == (3, 64, 4) and torch.equal(b[1], v.reclora_B[:, 4:8])
    bound = 1 / math.sqrt(64)  # each A_k as LoRA's A: kaiming-uniform(a=√5) on (r, in)
    assert 0.9 * bound < v.reclora_A.abs().max() <= bound and torch.equal(v.reclora_B, torch.zeros_like(v.reclora_B))
    gate = 16 * 2 + (16 * 60 + 60) + (60 * 3 + 3)
    assert lorakit.count_parameters(model)[0] == 2 * (2 * 12 * 64 + gate)
    with lorakit.disabled(model), torch.no_grad():
        base = model(X)
    assert torch.equal(routed(model, X, U), base)  # B = 0: no change for any user


def test_output_is_the_product_of_the_mixed_factors():
    model = injected(rec(temperature=0.7))
    ref = reference(model, X, U)
    assert close(routed(model, X, U), ref)  # in-place inference path
    assert close(routed(model, X, U, grad=True).detach(), ref)  # autograd path
    assert not close(ref, reference(model, X, U, product_of_sums=False))  # (Σ w B)(Σ w A) ≠ Σ w B A
    # rows of u map to the flattened token axis: a (batch·seq, features) input with u per sequence, and u per token
    assert close(routed(model, X.reshape(20, 64), U), ref.reshape(20, 64))
    u_tok = torch.randn(20, D_U, generator=G)
    assert close(routed(model, X, u_tok), reference(model, X, u_tok))
    one = U[:1]  # R = 1: the same user everywhere
    assert close(routed(model, X, one), reference(model, X, one.expand(4, D_U)))
    raw = injected(rec(softmax=False))  # raw logits as weights
    assert close(routed(raw, X, U), reference(raw, X, U))


def test_one_hot_gate_equals_a_plain_lora_with_that_meta_lora():
    model = injected(rec(r=4, bank_size=4))
    plain = mlp()
    lorakit.inject(plain, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    k = 2
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            v, lora = getattr(model, name).adapters["default"], getattr(plain, name).adapters["default"]
            v.reclora_gate.fc2.bias.zero_()[k] = 1e4  # softmax gives exactly one-hot weights
            a, b = v.bank()
            lora.lora_A.copy_(a[k])
            lora.lora_B.copy_(b[k])
    with torch.no_grad():
        expected = plain(X)
    assert close(routed(model, X, U), expected)
    assert close(routed(model, X, U, grad=True).detach(), expected)


def test_users_in_one_batch_differ_and_each_row_equals_running_it_alone():
    model = injected(rec())
    out = routed(model, X, U)
    for i in range(4):
        assert close(out[i:i + 1], routed(model, X[i:i + 1], U[i:i + 1]))
        assert not close(out[i:i + 1], routed(model, X[i:i + 1], U[(i + 1) % 4:(i + 1) % 4 + 1]))
    same_x = X[:1].expand(4, 5, 64)  # one input, four users: four outputs
    outs = routed(model, same_x, U)
    assert all(not close(outs[i], outs[j]) for i in range(4) for j in range(i))


def test_mixed_batch_of_adapter_names_with_conditions_equals_each_row_alone():
    model = injected(rec(), "a", seed=1)
    injected(rec(r=2, bank_size=3), "b", seed=2, model=model)
    names = ["b", "a", lorakit.BASE, "a"]
    expected = []
    for i, name in enumerate(names):
        if name == lorakit.BASE:
            with lorakit.disabled(model), torch.no_grad():
                expected.append(model(X[i:i + 1]))
            continue
        lorakit.set_active(model, [name])
        expected.append(routed(model, X[i:i + 1], U[i:i + 1]))
    expected = torch.cat(expected)
    for grad in (False, True):
        assert close(routed(model, X, U, grad=grad, adapter_names=names).detach(), expected)


def test_gradients_reach_the_bank_and_the_gate_not_the_user_vectors():
    model = injected(rec())
    model.train()
    u = U.clone().requires_grad_()
    routed(model, X, u, grad=True).pow(2).sum().backward()
    v = model.fc1.adapters["default"]
    for name, p in v.file_tensors().items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    assert u.grad is None  # u is detached before the gate (frozen user encoder)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_gate_dropout_draws_once_per_condition_row_in_training():
    model = injected(rec(gate_dropout=0.5, targets=["fc1"]))
    model.train()
    x = X[0, 0].expand(15, 64)  # 15 identical tokens
    per_row = routed(model, x, U[:1])  # one user row: one gate dropout draw shared by every token
    assert torch.equal(per_row, per_row[:1].expand(15, 64))
    per_token = routed(model, x, U[:1].expand(15, D_U))  # the same user given per token: a draw per token
    assert not close(per_token, per_token[:1].expand(15, 64))
    model.eval()
    assert torch.equal(routed(model, X, U), routed(model, X, U))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = injected(rec(bank_size=3, temperature=2.0))
    lorakit.save_adapter(model, tmp_path / "first")
    config = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAKIT_RECLORA" and config["options"]["user_dim"] == D_U
    fresh = mlp()
    lorakit.load_adapter(fresh, tmp_path / "first")
    for (k, t), (k2, t2) in zip(lorakit.adapter_parameters(model, "default").items(),
                                lorakit.adapter_parameters(fresh, "default").items()):
        assert k == k2 and torch.equal(t, t2), k
    assert any("reclora_gate.fc2.weight" in k for k in lorakit.adapter_parameters(fresh, "default"))
    assert torch.equal(routed(fresh, X, U), routed(model, X, U))
    lorakit.save_adapter(fresh, tmp_path / "second")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "first" / f).read_bytes() == (tmp_path / "second" / f).read_bytes()


def test_personal_lora_folder_is_that_users_adapter(tmp_path):
    """A user's plain LoRA folder, written from the saved bank (different ranks per layer, rsLoRA, temperature),
    loaded on a fresh base and run without any routing, equals the bank routed with that user; PEFT reads it too."""
    from peft import PeftModel

    from lorakit.variants.reclora import personal_lora

    config = dataclasses.replace(rec(r=4, bank_size=3, temperature=0.5), rank_pattern={"fc2": 2}, use_rslora=True)
    model = injected(config)
    assert model.fc2.adapters["default"].reclora_B.abs().min() > 0
    lorakit.save_adapter(model, tmp_path / "bank")
    for i in range(2):
        folder = personal_lora(tmp_path / "bank", U[i].tolist(), tmp_path / f"user{i}")
        plain = json.loads((folder / "adapter_config.json").read_text())
        assert plain["peft_type"] == "LORA" and plain["rank_pattern"] == {"fc2": 2}
        fresh = mlp()
        lorakit.load_adapter(fresh, folder)
        with torch.no_grad():
            assert close(fresh(X[i:i + 1]), routed(model, X[i:i + 1], U[i:i + 1]))
            assert close(PeftModel.from_pretrained(mlp(), str(folder))(X[i:i + 1]), fresh(X[i:i + 1]))
    users = [lorakit.read_adapter(tmp_path / f"user{i}")[1]["fc1.lora_A.weight"] for i in range(2)]
    assert not torch.allclose(*users)
    with pytest.raises(ConfigError, match="16 finite numbers, got 3"):
        personal_lora(tmp_path / "bank", [1.0, 2.0, 3.0], tmp_path / "bad")
    with pytest.raises(ConfigError, match="NaN"):
        personal_lora(tmp_path / "bank", [float("nan")] * D_U, tmp_path / "bad")
    with pytest.raises(ConfigError, match="not a RecLoRA bank"):
        personal_lora(tmp_path / "user0", U[0], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_not_mergeable():
    model = injected(rec())
    with pytest.raises(MergeError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        lorakit.merge_and_unload(model)
    with pytest.raises(MergeError, match="low-rank"):
        lorakit.export_lora(model, "/nonexistent/never-written")
    with pytest.raises(MergeError, match="token-dependent"):
        merge_adapters(model, ["default"], [1.0], "m")
    v = model.fc1.adapters["default"]
    assert v.factors() is None and not model.fc1.merged
    with pytest.raises(UnsupportedFeatureError, match="depends on the user"):
        v.trained_pairs()
    assert close(routed(model, X, U), reference(model, X, U))


def test_invalid_options_and_targets():
    with pytest.raises(ConfigError, match="user_dim"):
        lorakit.AdapterConfig(r=4, variant="reclora", options={})
    for bad, match in [(dict(user_dim=0), "user_dim"), (dict(bank_size=0), "bank_size"),
                       (dict(gate_hidden=2.5), "gate_hidden"), (dict(gate_dropout=1.0), "gate_dropout"),
                       (dict(temperature=0), "temperature"), (dict(condition_key=""), "condition_key"),
                       (dict(softmax="yes"), "softmax"), (dict(nope=1), "unknown option")]:
        with pytest.raises(ConfigError, match=match):
            rec(**bad)
    model = convnet()
    with pytest.raises(TargetError, match="Linear layers only"):
        lorakit.inject(model, rec(targets=["conv"]))
    assert lorakit.adapter_names(model) == []


def test_condition_errors_are_routing_errors():
    model = injected(rec())
    with pytest.raises(RoutingError, match="conditions=.*'user'"):
        model(X)  # no condition
    with pytest.raises(RoutingError, match="needs the user representation 'user'"):
        with lorakit.route(model, conditions={"item": U}), torch.no_grad():
            model(X)  # another condition only
    with pytest.raises(RoutingError, match="width user_dim=16"):
        routed(model, X, U[:, :8])
    with pytest.raises(RoutingError, match="3 rows .* 20 tokens"):
        routed(model, X, U[:3])
    with pytest.raises(RoutingError, match="floating point"):
        routed(model, X, U.long())
    with pytest.raises(RoutingError, match="non-finite"):
        routed(model, X, torch.full_like(U, float("nan")))
    with pytest.raises(RoutingError, match=r"\(rows, d\)"):
        routed(model, X, U[0])
    with pytest.raises(RoutingError, match="dict"):
        with lorakit.route(model, conditions=U):
            pass
    with pytest.raises(RoutingError, match="no condition 'item'"):
        Routing(None, conditions={"user": U}).condition("item", X)
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))
    assert close(routed(model, X, U), reference(model, X, U))  # still usable


def test_routing_condition_maps_rows_to_tokens():
    u = torch.arange(8.0).view(4, 2)
    r = Routing(None, conditions={"user": u})
    x = torch.zeros(4, 3, 5)
    assert torch.equal(r.condition("user", x), u[:, None].expand(4, 3, 2))  # per sequence
    assert torch.equal(r.condition("user", torch.zeros(12, 5)), u.repeat_interleave(3, 0))  # flattened tokens
    rows = torch.tensor([3, 1])  # a slice of the input's rows (per-row routing): their conditions
    assert torch.equal(r.condition("user", x[rows], rows, 4), u[rows][:, None].expand(2, 3, 2))
    assert torch.equal(r.condition("user", torch.zeros(2, 5), torch.tensor([5, 11]), 12), u[[1, 3]])
    per_token = torch.arange(24.0).view(12, 2)
    r = Routing(None, conditions={"user": per_token})
    assert torch.equal(r.condition("user", x), per_token.view(4, 3, 2))
    assert torch.equal(r.condition("user", x[rows], rows, 4), per_token.view(4, 3, 2)[rows])
    r = Routing(None, conditions={"user": torch.arange(12.0).view(6, 2)})  # two tokens per condition row
    assert torch.equal(r.condition("user", torch.zeros(2, 6, 5)),
                       torch.arange(12.0).view(6, 2).repeat_interleave(2, 0).view(2, 6, 2))
    assert r.condition("user", x, fn=lambda c: c.sum(-1, keepdim=True)).shape == (4, 3, 1)


def test_generate_with_one_user_per_sequence():
    model = llama(eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, variant="reclora",
                                                target_modules=["q_proj", "v_proj", "down_proj"],
                                                options={"user_dim": D_U, "bank_size": 4}))
    perturb(model, scale=3.0)
    ids = torch.randint(1, 128, (3, 5), generator=G)
    u = torch.randn(3, D_U, generator=G)
    for kw in (dict(max_new_tokens=5, do_sample=False), dict(max_new_tokens=4, num_beams=2, do_sample=False)):
        with torch.no_grad(), lorakit.route(model, conditions={"user": u}):
            together = model.generate(ids, **kw)
        for i in range(3):
            with torch.no_grad(), lorakit.route(model, conditions={"user": u[i:i + 1]}):
                assert torch.equal(together[i:i + 1], model.generate(ids[i:i + 1], **kw))
    with torch.no_grad():
        with lorakit.route(model, conditions={"user": u[:1].expand(3, D_U)}):
            first = model(ids).logits
        with lorakit.route(model, conditions={"user": u}):
            own = model(ids).logits
    assert close(own[0], first[0]) and not close(own[1:], first[1:])  # users change the output
