"""The checks every variant passes (issue 4 acceptance), shared by the per-method test files.

A method's test file builds its configs and calls these:
- `perturb`: move every trainable tensor of an adapter away from its init (no B = 0 shortcuts);
- `check_merge_cycle`: merge / unmerge / merge_and_unload / unload give the right outputs and weights back;
- `check_save_load_save`: save → load into a fresh model → equal outputs → save again → identical files;
- `check_mixed_batch`: rows routed to two adapters equal each row run alone (no-grad and autograd paths);
- `planted_task`: a frozen random 64→64→64 MLP learns a teacher with a planted ΔW on its first layer.

Smaller shared helpers: `injected` (inject + perturb), `check_export_loads_in_peft` (export_lora → PEFT), the PEFT
file helpers (`perturb_peft`, `peft_trained`, `config_meaning`, `check_peft_files_both_ways`) and those of the
residual-init variants PiSSA and OLoRA (`adapted_layers`, `rel_err`, `residual_init_error`, `copy_lora_into_peft`).
"""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
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


def injected(config, name="default", seed=0, model=None, seed_torch=True):
    """`model` (a fresh `mlp()` by default) with adapter `config` injected as `name`, then `perturb`ed with `seed`.
    `seed_torch`: seed torch's global RNG with `seed` before injecting (random inits then do not depend on what ran
    before)."""
    model = mlp() if model is None else model
    if seed_torch:
        torch.manual_seed(seed)
    lorakit.inject(model, config, name)
    perturb(model, name, seed=seed)
    return model


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


def check_vision(vit_config, conv_config, tmp_path, at_rank=None):
    """ViT (`vit_config`) and the conv net (`conv_config`), each with a perturbed adapter: the merge cycle (run at
    rank `at_rank` when given, for nested-rank variants) and save → load → save."""
    from models import convnet, inputs, vit

    for base, config, ids in ((vit, vit_config, inputs("vit")), (convnet, conv_config, inputs("convnet", batch=3, seq=9))):
        def build():
            model = base()
            torch.manual_seed(0)
            lorakit.inject(model, config)
            perturb(model)
            return model
        model = build()
        if at_rank is None:
            check_merge_cycle(model, ids)
        else:
            from lorakit.rank.truncate import at_rank as rank_context

            with rank_context(model, at_rank):
                check_merge_cycle(model, ids)
        check_save_load_save(build(), base(), ids, tmp_path / base.__name__)


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


def train_planted(config, steps=300, lr=1e-2, full_rank=False, seed=0, batch=200, init=None, hook=None):
    """Train adapter `config` (target fc1 unless the config says otherwise) on 2,000 Gaussian inputs to match the
    teacher; returns (model in eval mode, test inputs, test targets, test MSE before). `init(model, loader)` runs a
    data-driven initialization first when given; `hook(model, step)` runs before each step."""
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
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(model(x_test), y_test).item()
    model.train()
    for step in range(steps):
        if hook is not None:
            hook(model, step)
        i = (step * batch) % len(x)
        loss = torch.nn.functional.mse_loss(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x_test, y_test, before


def planted_task(config, steps=300, lr=1e-2, full_rank=False, seed=0, batch=200, init=None):
    """(test MSE before, test MSE after, trainable parameter count) of `train_planted`."""
    model, x_test, y_test, before = train_planted(config, steps, lr, full_rank, seed, batch, init)
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model(x_test), y_test).item()
    return before, after, sum(p.numel() for p in model.parameters() if p.requires_grad)


def mse_loss(model, batch):
    """`loss_fn` for `lorakit.initialize` on the planted task's (x, y) batches."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


# ---- export and PEFT's files ------------------------------------------------------------------------------
def check_export_loads_in_peft(model, fresh_base, inputs, folder, r=None):
    """`export_lora` leaves the adapter as it was and writes a plain PEFT LoRA (of rank `r` when given) that PEFT
    loads on `fresh_base` (a new copy of the original base model) with the adapter's outputs. Returns PEFT's model."""
    expected = run(model, inputs)
    lorakit.export_lora(model, folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA"
    if r is not None:
        assert data["r"] == r
    assert torch.equal(run(model, inputs), expected)
    loaded = PeftModel.from_pretrained(fresh_base, str(folder)).eval()
    assert close(run(loaded, inputs), expected)
    return loaded


@torch.no_grad()
def perturb_peft(peft_model, seed=0, scale=0.3, floor=0.0, relative=True):
    """Add N(0, 1)·`scale` noise to every trainable tensor of a PEFT model (as training would), times (RMS of the
    tensor + `floor`) when `relative`; the noise is drawn from a generator seeded with `seed`. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for p in peft_model.parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g) * scale
            p.add_(noise * (p.pow(2).mean().sqrt() + floor) if relative else noise)
    return peft_model


def peft_trained(model, config, seed=0):
    """`get_peft_model(model, config)` with torch seeded by `seed`, perturbed (`perturb_peft`, seed + 1), in eval
    mode."""
    torch.manual_seed(seed)
    return perturb_peft(get_peft_model(model, config), seed + 1).eval()


def config_meaning(folder, *provenance):
    """`folder`'s adapter_config.json without what only tells who wrote it: `auto_mapping` (PEFT writes the model's
    class, lorakit null) and the `provenance` keys; target_modules sorted (PEFT writes a set, in any order)."""
    data = json.loads((folder / "adapter_config.json").read_text())
    for key in ("auto_mapping", *provenance):
        data.pop(key)
    data["target_modules"] = sorted(data["target_modules"])
    return data


def check_peft_files_both_ways(peft_model, build, inputs, folder, extra_key=None):
    """`peft_model` saved by PEFT loads into `build()` (a fresh base) with PEFT's outputs; saved again by lorakit,
    the file has PEFT's tensors (names, dtypes, values) and PEFT's config, but for `extra_key` (a key lorakit may add
    and PEFT ignores with a warning); PEFT loads it with the same outputs. Returns `extra_key`'s value (None when
    lorakit did not write it)."""
    peft_model.save_pretrained(folder / "peft")
    ref = run(peft_model, inputs)
    ours = lorakit.load_adapter(build(), folder / "peft")
    assert close(run(ours, inputs), ref)
    lorakit.save_adapter(ours, folder / "ours")
    mine = config_meaning(folder / "ours")
    extra = mine.pop(extra_key, None) if extra_key else None
    assert mine == config_meaning(folder / "peft")
    theirs, ours_t = (load_file(folder / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert {k: t.dtype for k, t in ours_t.items()} == {k: t.dtype for k, t in theirs.items()}
    assert all(torch.equal(ours_t[k], theirs[k]) for k in theirs)
    with pytest.warns(UserWarning, match=extra_key) if extra is not None else contextlib.nullcontext():
        again = PeftModel.from_pretrained(build(), str(folder / "ours")).eval()
    assert close(run(again, inputs), ref)
    return extra


# ---- residual-init variants (PiSSA, OLoRA): A, B start at the principal part B₀A₀, the base keeps W ---------
def adapted_layers(model, name="default"):
    """path → AdaptedLayer, for the layers that hold adapter `name`."""
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters}


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def residual_init_error(ours, ref, name="default"):
    """Largest relative error of A, B and the residual W − s·B₀A₀ against PEFT's lora_A, lora_B and modified base
    (PEFT's base weight read as (out, in) on transposed layers), over at least one layer; A = A₀ and B = B₀."""
    peft_layers = dict(ref.named_modules())
    worst, count = 0.0, 0
    for path, layer in adapted_layers(ours, name).items():
        v, p = layer.adapters[name], peft_layers["base_model.model." + path]
        assert torch.equal(v.lora_A, v.lora_A0) and torch.equal(v.lora_B, v.lora_B0)
        residual = layer.kind.weight() - v.scale * v.lora_B0 @ v.lora_A0
        ref_w = p.base_layer.weight.T if layer.kind.transposed else p.base_layer.weight
        worst = max(worst, rel_err(v.lora_A, p.lora_A[name].weight), rel_err(v.lora_B, p.lora_B[name].weight),
                    rel_err(residual, ref_w))
        count += 1
    assert count > 0
    return worst


@torch.no_grad()
def copy_lora_into_peft(ours, ref, name="default"):
    """Write each adapted layer's trainable lora_A, lora_B into PEFT model `ref`'s layer of the same path; returns
    the (ours, PEFT's) tensor pairs."""
    peft_layers, pairs = dict(ref.named_modules()), []
    for path, layer in adapted_layers(ours, name).items():
        v, p = layer.adapters[name], peft_layers["base_model.model." + path]
        p.lora_A[name].weight.copy_(v.lora_A)
        p.lora_B[name].weight.copy_(v.lora_B)
        pairs += [(v.lora_A, p.lora_A[name].weight), (v.lora_B, p.lora_B[name].weight)]
    return pairs


def planted_loss_drop(model, opt, steps=80, batch=100):
    """(loss before, loss after) of `steps` steps of `opt` on the planted rank-4 task (1,000 inputs, seed 7)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1000, 64, generator=g)
    with torch.no_grad():
        y = planted_teacher()(x)

    def loss(i=None):
        xs, ys = (x, y) if i is None else (x[i:i + batch], y[i:i + batch])
        return torch.nn.functional.mse_loss(model(xs), ys)
    with torch.no_grad():
        before = loss().item()
    for step in range(steps):
        opt.zero_grad()
        loss((step * batch) % len(x)).backward()
        opt.step()
    with torch.no_grad():
        return before, loss().item()
