"""Adapter management: several adapters, activate, disable, delete, merge/unmerge/unload, trainable params."""
import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import AdaptedLayer, TrainedCopy
from models import convnet, minilm


def build(variant="lora", names=("a",), rs=False, noise=0.3):
    model = convnet()
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        cfg = lorakit.AdapterConfig(r=3 + i, lora_alpha=5, variant=variant, use_rslora=rs, init_lora_weights=False,
                                    target_modules=["emb", "conv", "conv2d"],
                                    modules_to_save=["head"] if i == 0 else None)  # one trained head may be active
        lorakit.inject(model, cfg, name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n or ".copies." in n:
                p.add_(torch.randn_like(p) * noise)
    return model


IDS = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))


def close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n and ".copies." not in n}


@pytest.mark.parametrize("variant,rs", [("lora", False), ("lora", True), ("dora", False), ("dora", True)])
def test_merge_unmerge_unload(variant, rs):
    model = build(variant, names=("a", "b"), rs=rs)
    lorakit.set_active(model, ["a", "b"])
    with torch.no_grad():
        ref = model(IDS)
        with lorakit.disabled(model):
            base = model(IDS)
        assert not close(ref, base)
        lorakit.merge(model)
        assert close(model(IDS), ref)
        lorakit.unmerge(model)
        assert close(model(IDS), ref)
        lorakit.merge(model, ["a"])            # merge one, keep the other live
        if variant == "lora":
            assert close(model(IDS), ref)
        else:                                  # a live DoRA needs the unmerged W: refused, not wrong
            with pytest.raises(lorakit.errors.MergeError):
                model(IDS)
        lorakit.merge(model, ["b"])            # then add the second on top
        assert close(model(IDS), ref)
        with lorakit.disabled(model):          # disabling a merged model gives the base back
            assert close(model(IDS), base)
        assert close(model(IDS), ref)
        plain = lorakit.merge_and_unload(copy.deepcopy(model))
        assert not any(isinstance(m, (AdaptedLayer, TrainedCopy)) for m in plain.modules())
        assert close(plain(IDS), ref)
        original = lorakit.unload(model)
        assert not any(isinstance(m, (AdaptedLayer, TrainedCopy)) for m in original.modules())
        assert close(original(IDS), base)


@pytest.mark.parametrize("variant,rs", [("lora", False), ("lora", True), ("dora", False), ("dora", True)])
def test_unmerge_restores_base_weights(variant, rs):
    """Adapters of trained size (ΔW up to ~W): W comes back within 1e-6·max|W| after merge + unmerge."""
    model = build(variant, names=("a", "b"), rs=rs, noise=0.02)
    lorakit.set_active(model, ["a", "b"])
    before = base_weights(model)
    lorakit.merge(model)
    assert any(not torch.equal(w, before[n]) for n, w in base_weights(model).items())
    lorakit.unmerge(model)
    for n, w in base_weights(model).items():
        assert (w - before[n]).abs().max() <= 1e-6 * before[n].abs().max(), n


def test_active_adapters_sum_their_deltas():
    model = build("lora", names=("a", "b"))
    x = torch.randn(2, 16, 5)
    with torch.no_grad():
        with lorakit.disabled(model):
            base = model.conv(x)
        deltas = []
        for name in ("a", "b"):
            lorakit.set_active(model, [name])
            deltas.append(model.conv(x) - base)
        lorakit.set_active(model, ["a", "b"])
        both = model.conv(x)
    assert close(both, base + deltas[0] + deltas[1])


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = build("lora", names=("a",))
    before = base_weights(model)
    with torch.no_grad():
        model.conv.adapters["a"].lora_B[0, 0] = float("inf")
    with pytest.raises(lorakit.errors.MergeError):
        lorakit.merge(model, safe=True)
    after = base_weights(model)
    assert all(torch.equal(after[n], w) for n, w in before.items())
    assert all(not m.merged for m in model.modules() if isinstance(m, AdaptedLayer))


def test_delete_adapter_restores_original_modules_when_last_goes():
    model = build("dora", names=("a", "b"))
    lorakit.set_active(model, ["a"])
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a"] and lorakit.active_adapters(model) == ["a"]
    assert all("b" not in m.adapters for m in model.modules() if isinstance(m, AdaptedLayer))
    lorakit.delete_adapter(model, "a")
    assert lorakit.adapter_names(model) == []
    assert type(model.conv) is nn.Conv1d and type(model.head) is nn.Linear


def test_trainable_parameters_and_counts():
    model = build("dora", names=("a", "b"))
    lorakit.mark_trainable(model, ["b"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n or ".copies.b." in n for n in trainable)
    n_train, n_total = lorakit.count_parameters(model)
    assert n_train == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_total == sum(p.numel() for p in model.parameters())
    expected = sum(t.numel() for t in lorakit.adapter_parameters(model, "b").values())
    assert n_train == expected


def test_training_moves_only_adapter_parameters():
    model = build("dora", names=("a",)).train()
    frozen = base_weights(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adapter_before = {k: t.detach().clone() for k, t in lorakit.adapter_parameters(model, "a").items()}
    for _ in range(3):
        opt.zero_grad()
        model(IDS).square().mean().backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in base_weights(model).items())
    moved = [k for k, t in lorakit.adapter_parameters(model, "a").items() if not torch.equal(t, adapter_before[k])]
    assert len(moved) == len(adapter_before)  # every A, B, magnitude and head tensor learned


def test_classification_task_trains_and_saves_its_head(tmp_path):
    """As PEFT: task_type SEQ_CLS adds the classifier head to modules_to_save."""
    model = minilm()
    lorakit.inject(model, lorakit.AdapterConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert isinstance(model.classifier, TrainedCopy)
    assert all(p.requires_grad for p in model.classifier.copies["default"].parameters())
    assert lorakit.get_config(model).modules_to_save == ["classifier", "score"]
    lorakit.save_adapter(model, tmp_path)
    assert "classifier.weight" in lorakit.read_adapter(tmp_path)[1]
