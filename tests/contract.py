"""The checks every variant passes (issue 4 acceptance), shared by the per-method test files.

A method's test file builds its configs and calls these:
- `perturb`: move every trainable tensor of an adapter away from its init (no B = 0 shortcuts);
- `check_merge_cycle`: merge / unmerge / merge_and_unload / unload give the right outputs and weights back;
- `check_save_load_save`: save → load into a fresh model → equal outputs → save again → identical files;
- `check_mixed_batch`: rows routed to two adapters equal each row run alone (no-grad and autograd paths);
- `planted_task`: a frozen random 64→64→64 MLP learns a teacher with a planted ΔW on its first layer.
"""
from __future__ import annotations

import copy
import json

import torch
from torch import nn

import lorakit
from lorakit.layers import AdaptedLayer, TrainedCopy


def close(a, b, tol=1e-5):
    """max|a − b| ≤ tol·max(1, max|b|) (the core issue's tolerance)."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def trainable_tensors(model, name="default"):
    return {k: t for k, t in lorakit.adapter_parameters(model, name).items()
            if isinstance(t, nn.Parameter) and t.is_floating_point()}


@torch.no_grad()
def perturb(model, name="default", scale=0.3, seed=0):
    """Add noise of `scale` × each tensor's RMS (or `scale` when it is all zero) to every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    for t in trainable_tensors(model, name).values():
        rms = t.float().pow(2).mean().sqrt().item() or 1.0
        t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * scale * rms)


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if ".adapters." not in n and ".copies." not in n and not n.startswith("lorakit_shared")}


def check_merge_cycle(model, inputs, name="default"):
    """The adapter changes the output; merging keeps it; unmerging restores W (1e-6·max|W|) and the output;
    disabling a merged model gives the base; merge_and_unload keeps the output; unload gives the base back."""
    lorakit.set_active(model, [name])
    ref = run(model, inputs)
    with lorakit.disabled(model):
        base = run(model, inputs)
    assert not close(ref, base), "the adapter does not change the output: the test would be trivial"
    before = base_weights(model)
    lorakit.merge(model, [name])
    assert close(run(model, inputs), ref)
    with lorakit.disabled(model):
        assert close(run(model, inputs), base)
    lorakit.unmerge(model)
    for n, w in base_weights(model).items():
        assert (w - before[n]).abs().max() <= 1e-6 * max(1.0, before[n].abs().max().item()), n
    assert close(run(model, inputs), ref)
    plain = lorakit.merge_and_unload(copy.deepcopy(model), [name])
    assert not any(isinstance(m, (AdaptedLayer, TrainedCopy)) for m in plain.modules())
    assert not hasattr(plain, "lorakit_shared")
    assert close(run(plain, inputs), ref)
    original = lorakit.unload(copy.deepcopy(model))
    assert close(run(original, inputs), base)


def check_save_load_save(model, fresh_model, inputs, tmp_path, name="default"):
    """Save, load into `fresh_model` (a new copy of the base), compare outputs, save again: identical files.
    Returns the loaded model."""
    first, second = tmp_path / "first", tmp_path / "second"
    lorakit.save_adapter(model, first, name)
    lorakit.load_adapter(fresh_model, first, name)
    lorakit.set_active(model, [name])
    assert close(run(fresh_model, inputs), run(model, inputs), tol=1e-6)
    lorakit.save_adapter(fresh_model, second, name)
    assert json.loads((first / "adapter_config.json").read_text()) == \
        json.loads((second / "adapter_config.json").read_text())
    assert (first / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()
    return fresh_model


def take(inputs, i):
    """Row i of a batch (a tensor or a dict of tensors with the batch first)."""
    return {k: v[i:i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i:i + 1]


def check_mixed_batch(model, inputs, names=("a", "b")):
    """`model` holds adapters `names`; rows routed to each (and to the base) equal single runs, in inference and
    with autograd on."""
    rows = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]
    plan = [lorakit.BASE if i % 3 == 2 else names[i % len(names)] for i in range(rows)]
    expected = []
    for i, n in enumerate(plan):
        if n == lorakit.BASE:
            with lorakit.disabled(model):
                expected.append(run(model, take(inputs, i)))
        else:
            lorakit.set_active(model, [n])
            expected.append(run(model, take(inputs, i)))
    expected = torch.cat(expected)
    with lorakit.route(model, plan):
        assert close(run(model, inputs), expected)
        with torch.enable_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            out = out.logits if hasattr(out, "logits") else out
        assert close(out.detach(), expected)


class MLP(nn.Module):
    """The planted task's frozen base: 64 → 64 → 64 with a GELU."""

    def __init__(self, dim=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().eval()


def planted_teacher(full_rank=False, seed=0):
    """The base MLP with ΔW planted on fc1: rank 4 (or full rank), ‖ΔW‖ about half of ‖W‖."""
    teacher = mlp(seed)
    g = torch.Generator().manual_seed(1234)
    w = teacher.fc1.weight
    delta = torch.randn(64, 64, generator=g) if full_rank else \
        torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g)
    with torch.no_grad():
        w.add_(delta * (0.5 * w.norm() / delta.norm()))
    return teacher


def planted_task(config, steps=300, lr=1e-2, full_rank=False, seed=0, batch=200, init=None):
    """Train adapter `config` (target fc1 unless the config says otherwise) on 2,000 Gaussian inputs to match the
    teacher; returns (test MSE before, test MSE after, trainable parameter count). `init(model, loader)` runs a
    data-driven initialization first when given."""
    g = torch.Generator().manual_seed(seed + 7)
    x, x_test = torch.randn(2000, 64, generator=g), torch.randn(500, 64, generator=g)
    teacher = planted_teacher(full_rank, seed)
    with torch.no_grad():
        y, y_test = teacher(x), teacher(x_test)
    model = mlp(seed)
    torch.manual_seed(seed)
    lorakit.inject(model, config)
    if init is not None:
        init(model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, 400, batch)])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)

    def mse(inp, target):
        return torch.nn.functional.mse_loss(model(inp), target)
    with torch.no_grad():
        before = mse(x_test, y_test).item()
    model.train()
    for step in range(steps):
        i = (step * batch) % len(x)
        loss = mse(x[i:i + batch], y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = mse(x_test, y_test).item()
    return before, after, sum(p.numel() for p in params)


def mse_loss(model, batch):
    """`loss_fn` for `lorakit.initialize` on the planted task's (x, y) batches."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
