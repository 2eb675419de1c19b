"""Shared pieces for variants: options, model-wide state, LowRankVariant, export as a plain LoRA, and the
data-driven initialization API with its gradient pass."""
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MergeError
from lorakit.init import passes, register_init
from lorakit.variants import register_variant
from lorakit.variants.base import LowRankVariant, Shared

from contract import (check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp, mse_loss, perturb,
                      planted_task, run)
from models import convnet


class ToyBasis(Shared):
    """A shared frozen pair sliced per layer (VeRA-like) plus one trainable model-wide vector."""

    def __init__(self, rows, cols, r, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("basis_a", torch.randn(r, cols, generator=g) / cols ** 0.5)
        self.register_buffer("basis_b", torch.randn(rows, r, generator=g) / r ** 0.5)
        self.gate = nn.Parameter(torch.ones(r))

    def file_tensors(self):
        return {"toy_gate": self.gate}


@register_variant
class ToyShared(LowRankVariant):
    """Test-only: ΔW = diag(λ)·B_s[:m]·diag(gate)·A_s[:, :n] with a trainable per-layer λ."""

    name = "test_toy_shared"
    peft_type = "LORAKIT_TEST_TOY_SHARED"

    @dataclass
    class Options:
        seed: int = 0

        def __post_init__(self):
            if self.seed < 0:
                raise ConfigError(f"option seed must be ≥ 0, got {self.seed}")

    @classmethod
    def build_shared(cls, config, sites):
        rows = max(s.kind.out_features for s in sites)
        cols = max(s.kind.in_features for s in sites)
        return ToyBasis(rows, cols, config.r, config.options["seed"])

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.lam = nn.Parameter(torch.empty(kind.out_features))

    def initialize(self, how):
        nn.init.zeros_(self.lam) if how is True else nn.init.normal_(self.lam)

    def file_tensors(self):
        return {"toy_lambda": self.lam}

    def factors(self):
        sh, k = self.shared, self.kind
        a = sh.basis_a[:, :k.in_features] * sh.gate[:, None]
        return a, sh.basis_b[:k.out_features] * self.lam[:, None], 1.0


@register_init("test_toy_grad_norm")
def _grad_norm_init(run, scale=1.0):
    """Test-only init: λ = scale · row norms of the summed base-weight gradient."""
    grads = passes.weight_gradients(run, "toy")
    for path, layer in passes.adapted_layers(run.model, run.name).items():
        with torch.no_grad():
            layer.adapters[run.name].lam.copy_(grads[path].norm(dim=1) * scale)


def toy(**kw):
    return lorakit.AdapterConfig(r=3, variant="test_toy_shared", **kw)


IDS = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))


def toy_convnet(names=("default",)):
    model = convnet()
    for i, n in enumerate(names):
        lorakit.inject(model, toy(target_modules=["conv", "conv2d", "head"], options={"seed": i}), n)
        perturb(model, n, seed=i)
    return model


def test_options_are_validated_and_filled_in():
    assert toy().options == {"seed": 0}
    with pytest.raises(ConfigError, match="seed"):
        toy(options={"seed": -1})
    with pytest.raises(ConfigError, match="sede"):
        toy(options={"sede": 1})
    with pytest.raises(ConfigError, match="takes no options"):
        lorakit.AdapterConfig(options={"seed": 1})


def test_shared_state_lives_once_and_is_saved_once(tmp_path):
    model = toy_convnet()
    shared = model.lorakit_shared["default"]
    layers = [m for m in model.modules() if isinstance(m, lorakit.layers.AdaptedLayer)]
    assert all(layer.adapters["default"].shared is shared for layer in layers)
    assert sum(1 for n, _ in model.named_parameters() if "gate" in n) == 1
    keys = lorakit.adapter_parameters(model, "default")
    assert "base_model.toy_gate" in keys and keys["base_model.toy_gate"] is shared.gate
    trainable, _ = lorakit.count_parameters(model)
    assert trainable == 3 + sum(layer.kind.out_features for layer in layers)
    loaded = check_save_load_save(model, convnet(), IDS, tmp_path)
    from safetensors.torch import load_file
    assert "base_model.toy_gate" in load_file(tmp_path / "first" / "adapter_model.safetensors")
    assert torch.equal(loaded.lorakit_shared["default"].gate, shared.gate)
    lorakit.delete_adapter(loaded, "default")
    assert not hasattr(loaded, "lorakit_shared")


def test_low_rank_variant_merges_routes_and_covers_conv():
    check_merge_cycle(toy_convnet(), IDS)
    check_mixed_batch(toy_convnet(("a", "b")), IDS)


def test_export_lora_loads_in_peft_with_equal_outputs(tmp_path):
    model = mlp()
    lorakit.inject(model, toy(target_modules=["fc1", "fc2"]))
    perturb(model)
    x = torch.randn(7, 64)
    lorakit.export_lora(model, tmp_path)
    peft_model = PeftModel.from_pretrained(mlp(), str(tmp_path))
    with torch.no_grad():
        assert close(peft_model(x), run(model, x))


def test_export_refuses_a_variant_without_low_rank_form(tmp_path):
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=2, use_dora=True, target_modules=["fc1"]))
    with pytest.raises(MergeError, match="low-rank"):
        lorakit.export_lora(model, tmp_path)
    assert not tmp_path.joinpath("adapter_model.safetensors").exists()


def test_gradient_pass_equals_explicit_gradients_and_frees_them():
    model = mlp()
    lorakit.inject(model, toy(target_modules=["fc1", "fc2"]))
    perturb(model)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)) for _ in range(3)]
    run_ = lorakit.init.InitRun(model, "default", data, mse_loss, progress=False)
    sums = passes.weight_gradients(run_)
    reference = mlp()
    explicit = {"fc1": 0, "fc2": 0}
    for x, y in data:
        reference.zero_grad()
        mse_loss(reference, (x, y)).backward()
        explicit = {k: explicit[k] + getattr(reference, k).weight.grad for k in explicit}
    for k in explicit:
        assert close(sums[k], explicit[k])
    assert all(p.grad is None for p in model.parameters())
    assert not model.fc1.base_layer.weight.requires_grad
    absolute = passes.weight_gradients(run_, absolute=True)
    assert (absolute["fc1"] >= sums["fc1"].abs() - 1e-6).all()


def test_initialize_runs_a_registered_method_and_restores_the_mode():
    model = mlp().train()
    lorakit.inject(model, toy(target_modules=["fc1"]))
    data = [(torch.randn(8, 64), torch.randn(8, 64))]
    lorakit.initialize(model, "test_toy_grad_norm", dataloader=data, loss_fn=mse_loss, scale=2.0, progress=False)
    assert model.training
    assert model.fc1.adapters["default"].lam.abs().sum() > 0
    with pytest.raises(ConfigError, match="unknown initialization"):
        lorakit.initialize(model, "nope", dataloader=data)
    with pytest.raises(ConfigError, match="dataloader"):
        lorakit.initialize(model, "test_toy_grad_norm", loss_fn=mse_loss)
    with pytest.raises(lorakit.errors.AdapterNameError):
        lorakit.initialize(model, "test_toy_grad_norm", dataloader=data, name="other")


def test_planted_task_is_learnable_by_lora_and_not_by_a_frozen_adapter():
    before, after, n = planted_task(lorakit.AdapterConfig(r=4, lora_alpha=4, target_modules=["fc1"]))
    assert after <= 0.5 * before and n == 4 * 128


def test_a_run_initializes_from_training_batches_when_the_variant_needs_data(tmp_path, monkeypatch):
    """`lorakit train` runs the variant's data init on `init_batches` training batches before training."""
    from lorakit.train import RunConfig, train
    from test_cli import write_sentiment

    calls = []
    monkeypatch.setattr(ToyShared, "data_init", classmethod(lambda cls, config, schedule: ("test_toy_grad_norm", {})))
    real = lorakit.init._METHODS["test_toy_grad_norm"]
    monkeypatch.setitem(lorakit.init._METHODS, "test_toy_grad_norm",
                        lambda run, **kw: calls.append(len(list(run.dataloader))) or real(run, **kw))
    data = write_sentiment(tmp_path / "data.jsonl", n=40)
    config = RunConfig.from_flat({"model": "tiny-llama", "data": data, "variant": "test_toy_shared", "r": 2,
                                  "init_batches": 2, "max_steps": 1, "per_device_train_batch_size": 4,
                                  "disable_tqdm": True, "output_dir": str(tmp_path / "run")})
    results = train(config)
    assert calls == [2] and results["steps"] == 1


def test_vit_default_targets_are_its_attention_projections():
    from models import build

    model, pixels = build("vit")
    lorakit.inject(model, lorakit.AdapterConfig(r=2, init_lora_weights=False))
    adapted = [p for p, m in model.named_modules() if isinstance(m, lorakit.layers.AdaptedLayer)]
    assert adapted == [f"vit.layers.{i}.attention.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    check_merge_cycle(model, pixels)


def test_adapting_the_vit_patch_conv_and_eval_mode_is_kept():
    """Models that read `module.weight` of an adapted layer keep working; new modules follow the model's mode
    (a dropout adapter injected into an eval-mode model does not drop at inference)."""
    from models import build

    model, pixels = build("vit")
    lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_dropout=0.5, init_lora_weights=False,
                                                target_modules=["projection", "q_proj"]))
    assert not any(m.training for m in model.modules())
    assert close(run(model, pixels), run(model, pixels), tol=0)
    check_merge_cycle(model, pixels)


def test_a_run_applies_the_init_setting_and_trains_what_it_made(tmp_path, monkeypatch):
    """`init: <method>` runs that initialization on the run's batches; an init that re-creates the adapter's
    parameters (as EVA does) gets an optimizer over the new ones."""
    from lorakit.train import RunConfig, train
    from test_cli import write_sentiment

    made = []

    def recreate(run, scale=1.0):
        config = lorakit.get_config(run.model, run.name)
        lorakit.delete_adapter(run.model, run.name)
        lorakit.inject(run.model, config, run.name)
        made.extend(p for p in run.model.parameters() if p.requires_grad)
        assert len(list(run.dataloader)) == 2 and scale == 3.0
    monkeypatch.setitem(lorakit.init._METHODS, "test_recreate", recreate)
    data = write_sentiment(tmp_path / "data.jsonl", n=40)
    config = RunConfig.from_flat({"model": "tiny-llama", "data": data, "r": 2, "init": "test_recreate",
                                  "init_args": {"scale": 3.0}, "init_batches": 2, "max_steps": 2,
                                  "per_device_train_batch_size": 4, "disable_tqdm": True,
                                  "output_dir": str(tmp_path / "run")})
    results = train(config)
    assert made and results["steps"] == 2
    saved = lorakit.read_adapter(tmp_path / "run" / "adapter")[1]
    b = [t for k, t in saved.items() if k.endswith("lora_B.weight")]
    assert b and any(t.abs().sum() > 0 for t in b)  # B starts at 0: only the optimizer can have moved it
