"""HypeLoRA: one hypernetwork + layer embeddings generate every layer's A and B, once per model forward."""
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.errors import ConfigError
from lorakit.train.trainer import _is_hook

from contract import check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp, perturb, planted_task, run

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
SMALL_MLP = dict(generator="mlp", hidden=64, depth=2, embedding_dim=16)  # deterministic in training (no dropout)


def hype(r=4, targets=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=2 * r, variant="hypelora", target_modules=list(targets),
                                 options=options)


def injected(config, name="default", seed=0, model=None, noise=True):
    model = model if model is not None else mlp()
    torch.manual_seed(seed)
    lorakit.inject(model, config, name)
    if noise:
        perturb(model, name, seed=seed)
    return model


def counting(model, name="default"):
    """A list whose length is the number of generator calls from now on."""
    calls = []
    model.lorakit_shared[name].generator.register_forward_hook(lambda *args: calls.append(1))
    return calls


def encoder_layer(d, f):
    return (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # attention, FFN, 2 norms


def test_trainable_count_is_generator_plus_embeddings():
    layers, m, n, r = 2, 64, 64, 4
    out = r * m  # fixed A: only B is generated
    # defaults = the reference's transformer runs: embeddings 64 → 256, 2 layers, FFN 2048, output projection
    model = injected(hype(), noise=False)
    e, d = 64, 256
    assert lorakit.count_parameters(model)[0] == layers * e + (e * d + d) + 2 * encoder_layer(d, 2048) + (d * out + out)
    gen = model.lorakit_shared["default"].generator
    layer = gen.encoder.layers[0]
    assert layer.dropout.p == 0.1 and layer.activation is torch.nn.functional.relu and not layer.norm_first
    # the reference's MLP runs: embeddings 128, three hidden layers of 2048, GELU
    model = injected(hype(generator="mlp"), noise=False)
    e, h = 128, 2048
    assert lorakit.count_parameters(model)[0] == layers * e + (e * h + h) + 2 * (h * h + h) + (h * out + out)
    model = injected(hype(generator="mlp", a_mode="generated", depth=4, hidden=32, embedding_dim=16), noise=False)
    e, h, out = 16, 32, r * (m + n)
    assert lorakit.count_parameters(model)[0] == layers * e + (e * h + h) + 2 * (h * h + h) + (h * out + out)
    model = injected(hype(hidden=32, heads=4, depth=1, ffn=64, embedding_dim=16), noise=False)
    e, d, out = 16, 32, r * m
    assert lorakit.count_parameters(model)[0] == layers * e + (e * d + d) + encoder_layer(d, 64) + (d * out + out)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "hypelora_A" in n)


def test_fixed_a_is_the_reference_kaiming_on_in_by_r_and_a_init_is_peft():
    """The reference draws A as (in, r) with kaiming_uniform_(a=√5): U(±1/√r); the blend target A_init is PEFT's
    lora_A init, U(±1/√in). Bound and std (bound/√3) within 5 %."""
    torch.manual_seed(0)
    model = lorakit.inject(torch.nn.Sequential(torch.nn.Linear(768, 64)),
                           lorakit.AdapterConfig(r=8, lora_alpha=16, variant="hypelora", target_modules=["0"]))
    v = model[0].adapters["default"]
    for t, bound in ((v.hypelora_A, 8 ** -0.5), (v.hypelora_A_init, 768 ** -0.5)):
        assert t.abs().max().item() <= bound and t.abs().max().item() == pytest.approx(bound, rel=0.05)
        assert t.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)


def test_init_delta_blends_both_factors_with_their_init():
    """a = 0.99 at init: B = 0.01·B_hyp (B_init = 0) and A = 0.01·A + 0.99·A_init (the reference blends A too):
    ΔW tiny but non-zero; at the end of the schedule ΔW = s·B_hyp·A."""
    model = injected(hype(), noise=False).eval()
    shared, v = model.lorakit_shared["default"], model.fc1.adapters["default"]
    assert float(shared.blend) == pytest.approx(0.99)
    initial = v.delta_weight().detach()
    assert initial.abs().max() > 0
    shared.set_step(10, 10)  # end of the schedule: a = 0
    full = v.delta_weight().detach()
    b_hyp = full @ torch.linalg.pinv(v.hypelora_A) / v.scale  # ΔW = s·B_hyp·A, A of full row rank
    blended_a = 0.01 * v.hypelora_A + 0.99 * v.hypelora_A_init
    assert close(initial, v.scale * (0.01 * b_hyp) @ blended_a, tol=1e-5)
    assert not close(initial, 0.01 * full, tol=1e-3)  # A is blended too, not only B


def test_blend_decays_linearly_through_the_trainer_hook_and_a_public_method():
    model = injected(hype())
    shared = model.lorakit_shared["default"]
    assert _is_hook(shared)  # the Trainer registers it
    seen = []
    for step in range(4):  # the Trainer calls the hook before each optimizer step with `step` finished steps
        shared.before_optimizer_step(SimpleNamespace(step=step, total_steps=4))
        seen.append(float(shared.blend))
    assert seen == pytest.approx([0.99 * 3 / 4, 0.99 * 2 / 4, 0.99 / 4, 0.0])
    assert shared.set_step(1, 4) == pytest.approx(0.99 * 3 / 4)
    assert injected(hype(blend="none")).lorakit_shared["default"].set_step(0, 4) == 0.0


def test_a_training_run_decays_the_blend_to_zero(tmp_path):
    """`lorakit train` registers the shared module's step hook: a is 0 after the last step."""
    from lorakit.train import RunConfig, train
    from lorakit.train.run import adapter_folder
    from test_cli import write_sentiment

    data = write_sentiment(tmp_path / "data.jsonl", n=24)
    config = RunConfig.from_flat({"model": "tiny-llama", "data": data, "variant": "hypelora", "r": 2,
                                  "max_steps": 3, "per_device_train_batch_size": 4, "disable_tqdm": True,
                                  "output_dir": str(tmp_path / "run")})
    assert train(config)["steps"] == 3
    _, tensors = lorakit.read_adapter(adapter_folder(tmp_path / "run"))
    assert float(tensors["base_model.hypelora_blend"]) == 0.0


def test_generator_runs_once_per_model_forward():
    model = injected(hype(targets=["fc1", "fc2"], a_mode="generated", **SMALL_MLP)).train()
    calls = counting(model)
    for _ in range(3):
        model(X).sum().backward()
    assert len(calls) == 3  # not once per layer
    # several forwards per step, each with its own backward (forward, forward, backward, backward)
    model.zero_grad()
    first, second = model(X[:3]).pow(2).sum(), model(X[3:]).pow(2).sum()
    first.backward()
    second.backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(X).pow(2).sum().backward()  # one forward of the whole batch: the same gradient
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert close(accumulated[n], p.grad), n
    assert len(calls) == 6
    # without autograd the factors are reused until a parameter changes
    model.eval()
    with torch.no_grad():
        out = [model(X) for _ in range(3)]
        assert len(calls) == 7
        perturb(model, seed=5)
        changed = model(X)
    assert len(calls) == 8 and torch.equal(out[0], out[2]) and not close(changed, out[0])


def test_random_a_is_resampled_per_training_forward_and_fixed_in_eval():
    model = injected(hype(a_mode="random")).train()
    v = model.fc1.adapters["default"]
    first, second = model(X), model(X)
    assert not close(first, second)
    model.eval()
    model.lorakit_shared["default"].set_step(1, 1)  # a = 0: A is the layer's frozen A
    a, _, _ = v.factors()
    assert torch.equal(a, v.hypelora_A)
    assert torch.equal(run(model, X), run(model, X))
    check_merge_cycle(model, X)


@pytest.mark.parametrize("options", [{}, {"a_mode": "generated", "generator": "transformer", "hidden": 16}])
def test_merge_cycle_and_save_load_save(tmp_path, options):
    check_merge_cycle(injected(hype(**options)), X)
    loaded = check_save_load_save(injected(hype(**options)), mlp(), X, tmp_path)
    assert float(loaded.lorakit_shared["default"].blend) == pytest.approx(0.99)


def test_saved_blend_round_trips(tmp_path):
    model = injected(hype())
    model.lorakit_shared["default"].set_step(3, 4)
    loaded = check_save_load_save(model, mlp(), X, tmp_path)
    assert float(loaded.lorakit_shared["default"].blend) == pytest.approx(0.99 / 4)


def test_mixed_batch_rows_equal_single_runs():
    model = injected(hype(), "a", seed=1)
    injected(hype(r=2, a_mode="generated", blend="none"), "b", seed=2, model=model)
    check_mixed_batch(model, X)


def test_export_as_plain_lora_loads_in_peft_with_equal_outputs(tmp_path):
    model = injected(hype(a_mode="generated"))
    model.lorakit_shared["default"].set_step(1, 2)
    lorakit.export_lora(model, tmp_path)
    peft_model = PeftModel.from_pretrained(mlp(), str(tmp_path))
    with torch.no_grad():
        assert close(peft_model(X), run(model, X))


def test_planted_task():
    # generated A (a fixed random A can only reach ΔW's part in its r-dim row space); a stays 0.99 in this
    # plain loop: A = 0.01·A_hyp + 0.99·A_init, B = 0.01·B_hyp
    before, after, n = planted_task(hype(r=4, targets=["fc1"], a_mode="generated", **SMALL_MLP), steps=60)
    assert after <= 0.5 * before and n == 16 + (16 * 64 + 64) + (64 * 4 * 128 + 4 * 128)


def test_invalid_options():
    for options, name in [({"a_mode": "learned"}, "a_mode"), ({"generator": "rnn"}, "generator"),
                          ({"hidden": 0}, "hidden"), ({"generator": "mlp", "depth": 1}, "depth"),
                          ({"blend_start": 1.5}, "blend_start"), ({"dropout": 1.0}, "dropout"),
                          ({"activation": "tanh"}, "activation"), ({"ffn": 0}, "ffn"),
                          ({"blend": "multiply"}, "blend"), ({"generator": "transformer", "hidden": 10}, "heads")]:
        with pytest.raises(ConfigError, match=name):
            hype(**options)
