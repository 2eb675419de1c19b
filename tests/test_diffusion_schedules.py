"""Step schedules for multi-LoRA composition in a real diffusers loop (`lorakit.compose.diffusion`): a seeded tiny
UNet2DConditionModel + CLIP text encoder, DDIM, classifier-free guidance, float64."""
import contextlib

import pytest
import torch
from diffusers import DDIMScheduler

import lorakit
from lorakit.compose.diffusion import (Composite, Dominant, Merge, Scheduled, Switch, add_random_loras, piecewise,
                                       sample, tiny_unet)
from lorakit.errors import ConfigError, RoutingError
from unets import prompt_batch, unet_with

pytestmark = pytest.mark.usefixtures("one_thread_module")
NAMES = ["a", "b", "c"]
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def unet():
    return unet_with(NAMES)


@pytest.fixture(scope="module")
def prompts():
    """(latents, cond, uncond) for a batch of 2, float64."""
    return prompt_batch()


def run(unet, prompts, steps, schedule=None):
    """Final latents and the latents after each step."""
    latents, cond, uncond = prompts
    trajectory = []
    out = sample(unet, DDIMScheduler(), latents, cond, uncond, steps, GUIDANCE, schedule,
                 callback=lambda i, t, z: trajectory.append(z))
    return out, trajectory


def plain(unet, prompts, steps, names):
    """Sampling with `names` active, no schedule."""
    before = lorakit.active_adapters(unet)
    lorakit.set_active(unet, names)
    try:
        return run(unet, prompts, steps)
    finally:
        lorakit.set_active(unet, before)


@contextlib.contextmanager
def forwards(unet):
    """Records every UNet forward: (active adapters, per-row routing names or None, args, kwargs, prediction)."""
    calls = []

    def hook(module, args, kwargs, output):
        routing = next(m.routing for _, m in lorakit.model.wrappers(module))
        names = routing.names if routing is not None and routing.per_row else None
        calls.append((lorakit.active_adapters(module), names, args, kwargs, output[0]))

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@torch.no_grad()
def eps_alone(unet, name, args, kwargs):
    """The UNet's prediction with only `name` active (None: the base model)."""
    before = lorakit.active_adapters(unet)
    lorakit.set_active(unet, [name] if name else [])
    try:
        return unet(*args, **kwargs)[0]
    finally:
        lorakit.set_active(unet, before)


def test_composite_step_is_cfg_of_the_mean_of_each_lora_alone(unet, prompts):
    latents, cond, uncond = prompts
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    x, emb = torch.cat([latents, latents]), torch.cat([uncond, cond])
    each = [eps_alone(unet, n, (x, t), {"encoder_hidden_states": emb}) for n in NAMES]
    assert min((p - q).abs().max() for p, q in zip(each, each[1:])) > 1e-2  # the LoRAs differ
    want = ddim_step(scheduler, torch.stack(each).mean(0), t, latents)
    schedule = Composite(NAMES)
    with forwards(unet) as calls:
        got, trajectory = run(unet, prompts, 4, schedule)
    assert torch.equal(trajectory[0], want)
    assert [active for active, *_ in calls] == [[n] for n in NAMES] * 4 and schedule.passes == 12
    merged, _ = run(unet, prompts, 4, Merge(NAMES))
    assert (merged - got).abs().max() > 1e-3  # averaging predictions is not summing deltas


def test_batched_composite_equals_separate_passes(unet, prompts):
    separate, batched = Composite(NAMES), Composite(NAMES, batched=True)
    want, _ = run(unet, prompts, 3, separate)
    with forwards(unet) as calls:
        got, _ = run(unet, prompts, 3, batched)
    # the random UNet amplifies a rounding difference ~100× per step (1e-13 on one pass, ~1e-8 after 3 steps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert len(calls) == batched.passes == 3 and separate.passes == 9
    assert all(names == NAMES and kwargs["encoder_hidden_states"].shape[0] == 12 for _, names, _, kwargs, _ in calls)
    separate.start(unet, [])
    for i, (_, _, (x, t), kwargs, _) in enumerate(calls):  # each step, on the batched run's own inputs: tight
        x, emb = x[:4], kwargs["encoder_hidden_states"][:4]
        assert all(torch.equal(x, part) for part in calls[i][2][0].chunk(3))  # N copies of the CFG batch
        torch.testing.assert_close(batched.predict(unet, x, t, emb, i), separate.predict(unet, x, t, emb, i),
                                   rtol=0, atol=1e-11)


def test_switch_cycles_every_tau_steps_and_each_step_is_that_lora_alone(unet, prompts):
    schedule = Switch(NAMES, every=2)
    with forwards(unet) as calls:
        _, trajectory = run(unet, prompts, 7, schedule)
    used = [active for active, *_ in calls]
    assert used == [["a"], ["a"], ["b"], ["b"], ["c"], ["c"], ["a"]] and schedule.passes == 7
    assert [schedule.active_at(i) for i in range(7)] == list("aabbcca")
    for (_, _, args, kwargs, eps), name in zip(calls, "aabbcca"):  # each pass is that LoRA's model, exactly
        assert torch.equal(eps, eps_alone(unet, name, args, kwargs))
    _, alone = plain(unet, prompts, 7, ["a"])
    assert all(torch.equal(p, q) for p, q in zip(trajectory[:2], alone[:2]))  # steps < τ: the a-only run
    assert (trajectory[2] - alone[2]).abs().max() > 1e-4  # from step τ on, b takes over


def test_piecewise_schedule_runs_the_first_lora_alone_before_tau(unet, prompts):
    weights = piecewise("a", "b", 0.5, 6)
    assert weights.switch == 3 and [weights(i) for i in (2, 3)] == [{"a": 1.0}, {"b": 1.0}]
    schedule = Scheduled(weights)
    with forwards(unet) as calls:
        _, trajectory = run(unet, prompts, 6, schedule)
    _, alone = plain(unet, prompts, 6, ["a"])
    assert all(torch.equal(p, q) for p, q in zip(trajectory[:3], alone[:3]))  # bit for bit
    assert (trajectory[3] - alone[3]).abs().max() > 1e-4
    assert [active for active, *_ in calls] == [["a"]] * 3 + [["b"]] * 3 and schedule.passes == 6


def test_scheduled_blends_go_through_per_token_weights(unet, prompts):
    """Weights 1 + 1 are the sum of both deltas (Merge); all-zero weights run the base model."""
    both, merged = Scheduled(lambda i, t: {"a": 1.0, "b": 1.0}), Merge(["a", "b"])
    with forwards(unet) as calls:
        run(unet, prompts, 3, both)
    assert [active for active, *_ in calls] == [list(lorakit.active_adapters(unet))] * 3  # no active-set switch
    merged.start(unet, [])
    for i, (_, _, (x, t), kwargs, eps) in enumerate(calls):
        torch.testing.assert_close(eps, merged.predict(unet, x, t, kwargs["encoder_hidden_states"], i),
                                   rtol=0, atol=1e-11)
    half, _ = run(unet, prompts, 1, Scheduled(lambda i, t: {"a": 0.5, "b": 0.5}))
    summed, _ = run(unet, prompts, 1, merged)
    assert (half - summed).abs().max() > 1e-4
    none, _ = run(unet, prompts, 3, Scheduled(lambda i, t: {"a": 0.0}))
    base, _ = plain(unet, prompts, 3, [])
    assert torch.equal(none, base)


def test_dominant_weights_average_to_one_and_rotate_at_refresh_steps():
    for n in range(1, 6):
        schedule = Dominant(list("pqrst")[:n])
        w_dom, w_nd = schedule.weights()
        assert (w_dom + (n - 1) * w_nd) / n == pytest.approx(1, abs=1e-12)
        assert w_dom == pytest.approx((n - 0.5) * w_nd)
    schedule = Dominant(["a", "b"], low=["c"], shift_at=0.5)
    assert schedule.refresh_steps(8) == [0, 2, 3, 6, 7]  # 2 until 37.5 %, 3 until 87.5 %, then 2
    assert schedule.refresh_steps(16) == [0, 2, 4, 6, 9, 12, 14]
    # high-frequency LoRAs dominate until step 4 (= 0.5·8), then the window [b, c]
    assert [dominant for dominant, _ in schedule.make_plan(8)] == list("aabaaacb")


def test_dominant_caching_skips_exactly_the_passes_it_claims(unet, prompts):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(8)
    timesteps = list(scheduler.timesteps)
    composite = Composite(NAMES)
    with forwards(unet) as calls:
        run(unet, prompts, 8, composite)
    assert len(calls) == composite.passes == 3 * 8
    refresh_steps = [0, 2, 3, 6, 7]
    expected = {"all": [(i, n) for i in refresh_steps for n in NAMES],  # every LoRA at each refresh step
                "dominant": [(0, "a"), (0, "b"), (0, "c"), (2, "b"), (3, "a"), (6, "c"), (7, "b")]}  # the new one
    for refresh, want in expected.items():
        schedule = Dominant(["a", "b"], low=["c"], shift_at=0.5, refresh=refresh)
        with forwards(unet) as calls:
            _, trajectory = run(unet, prompts, 8, schedule)
        assert len(calls) == schedule.passes == schedule.planned_passes(8) == len(want)
        assert [(args[1], active) for active, _, args, _, _ in calls] == [(timesteps[i], [n]) for i, n in want]
    # reused predictions ("dominant" run): step 1 is step 0's three with a dominant; step 2 recomputes b only
    eps = {n: out for (_, n), (*_, out) in zip(want, calls[:3])}
    for i, dominant in ((1, "a"), (2, "b")):
        eps.update({n: out for (step, n), (*_, out) in zip(want, calls) if step == i})
        torch.testing.assert_close(trajectory[i], ddim_step(scheduler, weighted(schedule, eps, dominant),
                                                            timesteps[i], trajectory[i - 1]), rtol=0, atol=1e-12)
    uncached = Dominant(NAMES, cache=False)
    with forwards(unet) as calls:
        run(unet, prompts, 4, uncached)
    assert len(calls) == uncached.passes == 12


def weighted(schedule, eps, dominant):
    w_dom, w_nd = schedule.weights()
    return sum((w_dom if n == dominant else w_nd) * e for n, e in eps.items()) / len(eps)


def ddim_step(scheduler, eps, t, latents):
    """One CFG step from a prediction on the [uncond; cond] batch."""
    u, c = eps.chunk(2)
    return scheduler.step(u + GUIDANCE * (c - u), t, latents, return_dict=False)[0]


def test_dominant_prediction_is_the_weighted_mean(unet, prompts):
    latents, cond, uncond = prompts
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    x, emb = torch.cat([latents, latents]), torch.cat([uncond, cond])
    each = [eps_alone(unet, n, (x, t), {"encoder_hidden_states": emb}) for n in NAMES]
    schedule = Dominant(NAMES, cache=False)
    want = ddim_step(scheduler, weighted(schedule, dict(zip(NAMES, each)), "a"), t, latents)
    _, trajectory = run(unet, prompts, 3, schedule)
    torch.testing.assert_close(trajectory[0], want, rtol=1e-12, atol=1e-12)
    _, composite = run(unet, prompts, 3, Composite(NAMES))
    assert (trajectory[0] - composite[0]).abs().max() > 1e-6  # the dominant weighting matters


@pytest.mark.parametrize("schedule", [
    Merge(["b"]), Switch(["b"], every=2), Composite(["b"]), Composite(["b"], batched=True),
    Dominant(["b"], cache=False), Scheduled(lambda i, t: {"b": 1.0}), Scheduled(piecewise("b", "c", 1.0, 4))],
    ids=["merge", "switch", "composite", "batched", "dominant", "scheduled", "piecewise"])
def test_one_lora_through_any_schedule_is_plain_sampling_with_it(unet, prompts, schedule):
    want, _ = plain(unet, prompts, 4, ["b"])
    base, _ = plain(unet, prompts, 4, [])
    assert (want - base).abs().max() > 1e-3
    before = lorakit.active_adapters(unet)
    lorakit.set_active(unet, ["c"])
    got, _ = run(unet, prompts, 4, schedule)
    assert torch.equal(got, want)
    assert lorakit.active_adapters(unet) == ["c"]  # sample leaves the active set as it was
    lorakit.set_active(unet, before)


def test_bad_input_is_refused_before_any_step(unet, prompts):
    for build in (lambda: Switch(NAMES, every=0), lambda: Switch(NAMES, every=1.5), lambda: Merge([]),
                  lambda: Composite("abc"), lambda: Composite(["a", "a"]), lambda: Dominant([], low=["a"]),
                  lambda: Dominant(["a"], refresh="sometimes"), lambda: piecewise("a", "b", 1.5, 4),
                  lambda: piecewise("a", "b", 0.5, 0), lambda: Scheduled("a")):
        with pytest.raises(ConfigError):
            build()
    with pytest.raises(ConfigError, match="at least one adapter"):
        Switch([])
    with pytest.raises(ConfigError, match="τ ≥ 1"):
        Switch(NAMES, every=0)
    refused = {
        RoutingError: [Merge(["a", "zz"]), Switch(["zz"]), Composite(["a", "zz"], batched=True),
                       Dominant(["a"], low=["zz"]), Scheduled(lambda i, t: {"a": 1.0} if i < 2 else {"zz": 1.0})],
        ConfigError: [Scheduled(piecewise("a", "b", 0.5, 3)), Scheduled(lambda i, t: {"a": float("nan")}),
                      Scheduled(lambda i, t: ["a"])],
    }
    for error, schedules in refused.items():
        for schedule in schedules:
            with forwards(unet) as calls, pytest.raises(error):
                run(unet, prompts, 4, schedule)
            assert calls == [] and schedule.passes == 0
    with pytest.raises(RoutingError, match=r"unknown adapter name\(s\) \['zz'\]"):
        run(unet, prompts, 4, Merge(["zz"]))
    latents, cond, uncond = prompts
    with pytest.raises(ConfigError, match="same shape"):
        sample(unet, DDIMScheduler(), latents, cond, uncond[:1], 4, GUIDANCE, Merge(["a"]))


def test_blends_refuse_loras_on_convolutions_before_any_step(prompts):
    unet = add_random_loras(tiny_unet().double(), ["a", "b"], targets=["to_q", "conv1"])
    blend = Scheduled(lambda i, t: {"a": 0.5, "b": 0.5})
    with forwards(unet) as calls, pytest.raises(RoutingError, match="linear layers only"):
        run(unet, prompts, 3, blend)
    assert calls == []
    one_hot, _ = run(unet, prompts, 3, Scheduled(piecewise("a", "b", 0.5, 3)))  # one LoRA per step: fine
    assert torch.isfinite(one_hot).all()
