"""AutoLoRA's gated fusion in a diffusers loop: the `Gated` schedule (timestep buckets per step) and `fit_gate`
(the gate's training objective), on the tests' tiny seeded UNet with random LoRAs."""
import pytest
import torch
from diffusers import DDIMScheduler

import lorakit
from lorakit.compose import FusionGate, MoleGate
from lorakit.compose.diffusion import Gated, Merge, fit_gate, gate_loss, sample, timestep_bucket
from lorakit.errors import ConfigError
from unets import prompt_batch, unet_with

pytestmark = pytest.mark.usefixtures("one_thread_module")
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def unet():
    return unet_with(NAMES)


@pytest.fixture(scope="module")
def prompts():
    return prompt_batch()


def run(unet, prompts, schedule, steps=4):
    latents, cond, uncond = prompts
    return sample(unet, DDIMScheduler(), latents, cond, uncond, steps, 5.0, schedule)


def set_gate(gate, bias, buckets=None):
    """g = σ(bias) whatever the activations (w_lora = w_cross = 0, w_out = 1); `buckets`: per-bucket biases."""
    with torch.no_grad():
        for w in gate.weights:
            w[:2] = 0.0
            w[2], w[3] = bias, 1.0
            if buckets is not None:
                w[4:] = torch.tensor(buckets, dtype=w.dtype)[:, None]


def test_timestep_bucket():
    assert [timestep_bucket(t, 4) for t in (0, 249, 250, 999, 1000)] == [0, 0, 1, 3, 3]
    assert timestep_bucket(torch.tensor(500), 2, 1000) == 1


def test_gated_schedule_open_closed_and_per_step_buckets(unet, prompts):
    """A fully open fusion gate is the merge of all LoRAs, a closed one the base model; with buckets, each step's
    timestep picks its bucket (opened only in bucket 0 here: the late, low-noise steps) — checked pass by pass."""
    unet.float()
    prompts = tuple(p.float() for p in prompts)
    try:
        gate = FusionGate(unet, NAMES, timesteps=2)
        set_gate(gate, 60.0)
        merged = run(unet, prompts, Merge(NAMES))
        torch.testing.assert_close(run(unet, prompts, Gated(gate)), merged, rtol=1e-4, atol=1e-5)
        set_gate(gate, -60.0)
        with lorakit.disabled(unet):
            base = run(unet, prompts, None)
        torch.testing.assert_close(run(unet, prompts, Gated(gate)), base, rtol=1e-4, atol=1e-5)
        set_gate(gate, -60.0, buckets=[120.0, 0.0])  # bucket 0 (t < 500) open, bucket 1 closed
        seen = []
        forward = gate.forward
        gate.forward = lambda path, h, deltas: (seen.append(gate.step), forward(path, h, deltas))[1]
        schedule = Gated(gate)
        run(unet, prompts, schedule)
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(4)
        want = [timestep_bucket(t, 2) for t in scheduler.timesteps]
        assert want == [1, 1, 0, 0] and schedule.passes == 4
        per_pass = len(seen) // 4
        assert [seen[k * per_pass] for k in range(4)] == want and set(seen[:2 * per_pass]) == {1}
    finally:
        unet.double()


def test_gate_loss_is_autolora_objective_and_fit_gate_trains_the_gate_alone(unet, prompts):
    unet.float()
    try:
        latents, cond, uncond = (p.float() for p in prompts)
        scheduler = DDIMScheduler()
        gate = FusionGate(unet, NAMES, timesteps=2)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
        other = cond.flip(0)
        with torch.no_grad():
            got = gate_loss(unet, gate, scheduler, latents, cond, other, 700, noise, margin=5.0)
            x_t = scheduler.add_noise(latents, noise, torch.tensor([700, 700]))
            with lorakit.route(unet, weights=gate, adapters=NAMES):
                own_mse = (unet(x_t, 700, encoder_hidden_states=cond)[0] - noise).pow(2).mean()
                wrong_mse = (unet(x_t, 700, encoder_hidden_states=other)[0] - noise).pow(2).mean()
        assert gate.step == 1 and wrong_mse < 5.0
        torch.testing.assert_close(got, own_mse + 5.0 - wrong_mse)
        frozen = {k: v.clone() for k, v in unet.state_dict().items()}
        before = [w.detach().clone() for w in gate.weights]
        g = torch.Generator().manual_seed(7)
        examples = {n: (torch.randn(6, 4, 8, 8, generator=g), cond[torch.randint(0, 2, (6,), generator=g)])
                    for n in NAMES[:2]}
        held_out = (examples["a"][0][:4], examples["a"][1][:4], examples["b"][1][:4], 300,
                    torch.randn(4, 4, 8, 8, generator=g))
        with torch.no_grad():
            start = gate_loss(unet, gate, scheduler, *held_out).item()
        losses = fit_gate(unet, gate, scheduler, examples, steps=25, batch=4, lr=0.05, uncond=uncond[:1],
                          progress=False)
        with torch.no_grad():
            end = gate_loss(unet, gate, scheduler, *held_out).item()
        assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
        assert end < start, (start, end)
        assert all(not torch.equal(w, b) for w, b in zip(gate.weights, before))
        assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())  # UNet and LoRAs untouched
        assert not hasattr(unet, "lorakit_gate") and any(p.requires_grad for p in unet.parameters())
        with pytest.raises(ConfigError, match="at least two"):
            fit_gate(unet, gate, scheduler, {"a": examples["a"]})
        with pytest.raises(ConfigError, match="uncond"):
            fit_gate(unet, gate, scheduler, examples)
        with pytest.raises(ConfigError, match="gate with `names`"):
            Gated(object())
        mole = MoleGate(unet, NAMES)
        assert len(fit_gate(unet, mole, scheduler, examples, steps=2, drop_prompt=0.0, progress=False)) == 2
    finally:
        unet.double()
