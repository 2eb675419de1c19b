"""Device-generic paths, run on `LORAKIT_TEST_DEVICE` (default cpu; `bench/gpu_check.sh` sets cuda).

Adapters, DoRA, mixed-batch routing, the instruct task, a bf16 training run and checkpoint RNG state on one device,
checked against the same computation on the CPU or against PEFT 0.21.2 on the same device. Adapters have B ≠ 0.
"""
from __future__ import annotations

import os

import pytest
import torch

from models import llama  # sets HF_HUB_OFFLINE
import lorakit
from lorakit.train.devices import device_of, resolve_device, to_device

DEVICE = resolve_device(os.environ.get("LORAKIT_TEST_DEVICE", "cpu"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(rows: int = 4, seq: int = 9, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (rows, seq), generator=g), "attention_mask": torch.ones(rows, seq,
                                                                                                       dtype=torch.long)}


def randomize_adapters(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # (not through .data, which hides the change from DoRA's norm cache)
        for p in params:
            p.copy_((torch.rand(p.shape, generator=g) - 0.5).to(p))


def lorakit_model(names=("a", "b"), dora=False):
    model = llama()
    for i, name in enumerate(names):
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora,
                                                    init_lora_weights=False), name)
        randomize_adapters(lorakit.adapter_parameters(model, name).values(), seed=i + 1)
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_forward_and_gradients_match_the_cpu(dora):
    cpu = lorakit_model(("a",), dora)
    dev = lorakit_model(("a",), dora).to(DEVICE)
    x = batch()
    ref = cpu(**x).logits
    out = dev(**to_device(x, DEVICE)).logits
    assert out.device.type == DEVICE.type
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p), q in zip(cpu.named_parameters(), dev.parameters()):
        if p.requires_grad:
            assert q.grad is not None and q.grad.device.type == DEVICE.type, name
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mixed_batch_matches_peft_on_the_device(tmp_path, dora):
    """Rows routed to adapters one, two and the base: lorakit's `route` vs PEFT running each adapter alone (and its
    `adapter_names` mixed batch, which it refuses with DoRA), both on the device, PEFT loading lorakit's files."""
    from peft import PeftModel

    ours = lorakit_model(("one", "two"), dora).to(DEVICE).eval()
    for name in ("one", "two"):
        lorakit.save_adapter(ours, tmp_path / name, name)
    peft = PeftModel.from_pretrained(llama(), tmp_path / "one", adapter_name="one")
    peft.load_adapter(tmp_path / "two", adapter_name="two")
    peft = peft.to(DEVICE).eval()
    names = ["one", "__base__", "two", "one"]
    x = to_device(batch(), DEVICE)
    with torch.no_grad(), lorakit.route(ours, names):
        mine = ours(**x).logits
    with torch.no_grad():
        with peft.disable_adapter():
            plain = peft(**x).logits
        alone = {}
        for name in ("one", "two"):
            peft.set_adapter(name)
            alone[name] = peft(**x).logits
        theirs = torch.stack([plain[i] if n == "__base__" else alone[n][i] for i, n in enumerate(names)])
        if not dora:  # PEFT's own mixed batch (it refuses one with DoRA)
            torch.testing.assert_close(peft(**x, adapter_names=names).logits, theirs, rtol=1e-5, atol=1e-5)
    assert (theirs[0] - plain[0]).abs().max() > 1e-2 and (theirs[2] - plain[2]).abs().max() > 1e-2
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_instruct_training_in_bf16_on_the_device(tmp_path):
    """A short bf16 run on the device: base in bf16, adapters and AdamW state fp32 on the device, loss falls."""
    from lorakit.train import RunConfig
    from lorakit.train import train as train_run

    config = RunConfig.from_flat(dict(model="tiny-llama", task="instruct", data="vader:movies", max_train_samples=64,
                                      max_eval_samples=16, max_steps=12, per_device_train_batch_size=8,
                                      learning_rate=3e-3, bf16=True, device=str(DEVICE), save_steps=6,
                                      output_dir=str(tmp_path / "run"), disable_tqdm=True))
    results = train_run(config)
    assert results["dtype"] == "bfloat16" and results["device"].startswith(DEVICE.type)
    losses = [r["loss"] for r in map(__import__("json").loads, (tmp_path / "run" / "metrics.jsonl").read_text()
                                     .splitlines()) if "loss" in r]
    assert len(losses) == 12 and all(map(lambda v: v == v, losses))
    assert sum(losses[-3:]) < sum(losses[:3])


def test_checkpoint_restores_the_device_rng(tmp_path):
    from lorakit.train import checkpoint

    model = lorakit_model(("a",)).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    torch.manual_seed(5)
    if DEVICE.type == "cuda":
        torch.cuda.manual_seed_all(5)
    path = checkpoint.save(tmp_path, checkpoint.trainable_state(model, opt), checkpoint.optimizer_state(opt),
                           {"step": 1, "best": None, "evals_without_gain": 0})
    expected = torch.rand(3, device=DEVICE)
    torch.rand(7, device=DEVICE)  # move the generators on
    checkpoint.restore(path, model, opt)
    torch.testing.assert_close(torch.rand(3, device=DEVICE), expected)
    assert device_of(model).type == DEVICE.type
