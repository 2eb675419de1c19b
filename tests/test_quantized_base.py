"""A quantized frozen base (lorakit.quantize, bitsandbytes on CPU): bytes, forward, gradients, training, merging,
files (4-bit ↔ fp32 bases, PEFT on the same quantized model), bad input, no Hub lookup.

Tolerances: with compute_dtype=fp32 a quantized base must equal an fp32 model holding its dequantized weights
(1e-5 relative: only summation order differs). Against the original fp32 weights, outputs differ by the
quantization error, measured on the seeded tiny Llama and bounded here with about 2x headroom.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

if importlib.util.find_spec("bitsandbytes") is None:
    pytest.skip("bitsandbytes is not installed (pip install 'lorakit[quant]')", allow_module_level=True)

from models import llama  # sets HF_HUB_OFFLINE

import lorakit
from lorakit.errors import QuantizeError
from lorakit.kinds import QuantLinearKind, kind_for
from lorakit.layers import AdaptedLayer
from lorakit.quantize import (QuantizedMergeWarning, dequantize, import_bnb, is_quantized, merge_errors,
                              quantize_base, stored, weight_bytes)

bnb = import_bnb()  # before anything else imports bitsandbytes (PEFT would, with the Hub lookup)
pytestmark = pytest.mark.usefixtures("one_thread_module")

METHODS = ["nf4", "fp4", "int8"]
BYTES_RATIO = {"nf4": 0.35, "fp4": 0.35, "int8": 0.6}       # of the fp32 model's weight bytes
# ‖logits − fp32 logits‖ / ‖fp32 logits‖ of the random tiny Llama; measured over 3 seeds × 2 batches:
# nf4 0.09–0.13, fp4 0.13–0.17, int8 0.009–0.010
FORWARD_REL = {"nf4": 0.2, "fp4": 0.3, "int8": 0.02}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def config(**kw) -> lorakit.AdapterConfig:
    return lorakit.AdapterConfig(**{**dict(r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights=False), **kw})


def adapted(model, **kw):
    """Inject a non-trivial adapter whose ΔW is about a tenth of W (a realistic size, so re-quantizing a merge
    stays near the base's own quantization error)."""
    lorakit.inject(model, config(**kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    return model


def dequantized_copy(fp32_model, quantized):
    """The fp32 model with every quantized Linear's weight replaced by its dequantized value."""
    out = copy.deepcopy(fp32_model)
    modules = dict(out.named_modules())
    for path, m in quantized.named_modules():
        if is_quantized(m):
            path = path.removesuffix(".base_layer")
            target = modules[path].base_layer if isinstance(modules[path], AdaptedLayer) else modules[path]
            with torch.no_grad():
                target.weight.copy_(dequantize(m))
    return out


def snapshot(model) -> dict:
    """Every tensor a model stores, by name, including quantized data and absmax / scales (cloned)."""
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for path, m in model.named_modules():
        if is_quantized(m):
            data, qs = stored(m)
            out[path + "#data"] = data.clone()
            out[path + "#scales"] = (qs.absmax if hasattr(qs, "absmax") else qs).clone()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- storage ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_weight_bytes_shrink(method):
    base = llama()
    fp32 = weight_bytes(base)
    q = quantize_base(llama(), method)
    assert weight_bytes(q) <= BYTES_RATIO[method] * fp32
    kinds = [type(m.weight.quant_state if method != "int8" else m) for m in q.modules() if is_quantized(m)]
    assert len(kinds) == 2 * len(LINEARS)  # lm_head skipped by default
    assert type(q.lm_head) is torch.nn.Linear
    m = q.model.layers[0].mlp.up_proj  # the codes themselves: ½ byte a weight for 4-bit, 1 for int8
    data = stored(m)[0]
    assert data.numel() * data.element_size() == m.in_features * m.out_features // (1 if method == "int8" else 2)


def test_weight_bytes_counts_tied_weights_once():
    tied = llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert weight_bytes(tied) == sum(p.numel() * 4 for p in tied.parameters()) + sum(
        b.numel() * b.element_size() for b in tied.buffers())


# ---- forward and backward --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_forward_close_to_fp32(method):
    base, x = llama(), ids()
    ref = logits(base, x)
    q = quantize_base(llama(), method)
    err = rel(logits(q, x), ref)
    assert 0 < err <= FORWARD_REL[method]


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fp32_compute_equals_dequantized_model(method, variant):
    """With fp32 compute the quantized base is exactly its dequantized weights: LoRA and DoRA (whose row norm
    reads the dequantized W) agree with an fp32 model holding those weights and the same adapter."""
    fp = adapted(llama(), use_dora=variant == "dora")
    q = quantize_base(copy.deepcopy(fp), method, compute_dtype=torch.float32)  # after inject
    assert all(isinstance(m.kind, QuantLinearKind) for m in q.modules() if isinstance(m, AdaptedLayer))
    ref = dequantized_copy(fp, q)
    x = ids()
    out, want = logits(q, x), logits(ref, x)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    with lorakit.disabled(q):
        assert rel(logits(q, x), logits(llama(), x)) <= FORWARD_REL[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_adapter_gradients(method, variant):
    q = adapted(quantize_base(llama(), method), use_dora=variant == "dora").train()  # before inject
    x = ids()
    q(x, labels=x).loss.backward()
    trainable = {n: p for n, p in q.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(LINEARS) * (3 if variant == "dora" else 2)
    for n, p in trainable.items():
        assert p.dtype == torch.float32, n  # fp32 master weights
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    # gradients reach the first layer's adapters through every quantized base below them
    assert q.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.grad.abs().sum() > 0


def test_gradients_after_an_eval_forward():
    """bitsandbytes repacks 4-bit weights for inference at an eval forward on AVX512-BF16 CPUs, after which a
    training forward loses the input gradient; lorakit keeps the training layout."""
    q = adapted(quantize_base(llama(), "nf4"))
    x = ids()
    before = logits(q.eval(), x)
    q.train()
    q(x, labels=x).loss.backward()
    assert q.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.grad.abs().sum() > 0
    assert torch.equal(logits(q.eval(), x), before)


def test_kind_unpacks_an_inference_layout_exactly():
    lin = torch.nn.Linear(128, 64)
    m = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
    m.load_state_dict(lin.state_dict())
    m = m.to("cpu").eval()
    with torch.no_grad():
        m(torch.randn(3, 128))
    before = dequantize(m)
    kind = kind_for(m)
    assert isinstance(kind, QuantLinearKind) and (kind.out_features, kind.in_features) == (64, 128)
    assert not getattr(stored(m)[1], "packing_format_for_cpu", False)
    assert torch.equal(dequantize(m), before)
    assert (before - lin.weight).abs().max() <= 0.2 * lin.weight.abs().max()  # nf4: ≤ ~0.14 of a block's absmax


def test_training_lowers_loss():
    torch.manual_seed(0)
    q = adapted(quantize_base(llama(), "nf4")).train()
    x = ids(shape=(4, 16))
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = q(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ---- merging ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_merge_requantizes_and_unmerge_restores_bytes(method):
    q = adapted(quantize_base(llama(), method))
    x = ids()
    base_state, out = snapshot(q), logits(q, x)
    with pytest.warns(QuantizedMergeWarning):
        lorakit.merge(q)
    errors = merge_errors(q)
    assert len(errors) == 2 * len(LINEARS)
    assert all(0 < e <= (0.2 if method != "int8" else 0.01) for e in errors.values())  # max error / max|W'|
    layer = q.model.layers[1].mlp.down_proj
    want = layer.kind.kept_weight() + layer.adapters["default"].delta_weight().detach()
    assert (dequantize(layer.base_layer) - want).abs().max().item() == pytest.approx(
        errors["model.layers.1.mlp.down_proj"] * want.abs().max().item(), rel=1e-5)
    assert rel(logits(q, x), out) <= FORWARD_REL[method]
    lorakit.unmerge(q)
    assert merge_errors(q) == {}
    assert_same(snapshot(q), base_state)
    assert torch.equal(logits(q, x), out)


def test_merge_twice_starts_from_the_original_bytes():
    q = adapted(quantize_base(llama(), "nf4"))
    lorakit.inject(q, config(), name="other")
    base_state = snapshot(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)
        lorakit.merge(q, ["default"])
        first = stored(q.model.layers[0].self_attn.q_proj.base_layer)[0].clone()
        lorakit.merge(q, ["default", "other"])
        lorakit.unmerge(q)
        lorakit.merge(q, ["default"])
    assert torch.equal(stored(q.model.layers[0].self_attn.q_proj.base_layer)[0], first)
    lorakit.unmerge(q)
    assert_same(snapshot(q), base_state)


def test_merge_and_unload_gives_a_plain_quantized_model():
    q = adapted(quantize_base(llama(), "int8"))
    x = ids()
    out = logits(q, x)
    with pytest.warns(QuantizedMergeWarning):
        plain = lorakit.merge_and_unload(q)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert isinstance(plain.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert rel(logits(plain, x), out) <= FORWARD_REL["int8"]


# ---- files -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_on_nf4(tmp_path_factory):
    """A folder with an adapter trained 3 steps on an nf4 base, and that model's outputs."""
    q = adapted(quantize_base(llama(), "nf4")).train()
    x = ids()
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = q(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("nf4-adapter")
    lorakit.save_adapter(q, folder)
    return folder, logits(q.eval(), ids(1))


def test_adapter_from_quantized_base_is_a_plain_peft_file(trained_on_nf4):
    from safetensors.torch import load_file

    folder, _ = trained_on_nf4
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * len(LINEARS)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_adapter_moves_between_quantized_and_fp32_bases(trained_on_nf4, tmp_path):
    folder, q_out = trained_on_nf4
    x = ids(1)
    fp = lorakit.load_adapter(llama(), folder)                      # 4-bit trained → fp32 base
    assert 0 < rel(logits(fp, x), q_out) <= FORWARD_REL["nf4"]
    lorakit.save_adapter(fp, tmp_path)                              # fp32 → 4-bit base: the same tensors
    q = lorakit.load_adapter(quantize_base(llama(), "nf4"), tmp_path)
    assert torch.equal(logits(q, x), q_out)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_peft_loads_a_lorakit_adapter_on_the_same_quantized_model(trained_on_nf4, method):
    """PEFT 0.21.2 wraps the bitsandbytes modules in its own bnb LoRA layers on CPU too; same outputs."""
    from peft import PeftModel
    from peft.tuners.lora import bnb as peft_bnb

    folder, _ = trained_on_nf4
    ours = lorakit.load_adapter(quantize_base(llama(), method), folder)
    base = quantize_base(llama(), method)
    setattr(base, "is_loaded_in_4bit" if method != "int8" else "is_loaded_in_8bit", True)  # as transformers sets
    pm = PeftModel.from_pretrained(base, folder).eval()
    wrapper = peft_bnb.Linear4bit if method != "int8" else peft_bnb.Linear8bitLt
    assert isinstance(pm.base_model.model.model.layers[0].mlp.up_proj, wrapper)
    x = ids(1)
    want = logits(ours, x)
    assert (logits(pm, x) - want).abs().max() <= 1e-5 * want.abs().max()


# ---- bad input -------------------------------------------------------------------------------------------
def test_unknown_method_leaves_model_unchanged():
    m = llama()
    before = snapshot(m)
    with pytest.raises(QuantizeError, match="unknown quantization method 'int4'"):
        quantize_base(m, "int4")
    assert_same(snapshot(m), before)


def test_already_quantized_model_is_refused_unchanged():
    q = adapted(quantize_base(llama(), "nf4"))
    before, types = snapshot(q), [type(m) for m in q.modules()]
    with pytest.raises(QuantizeError, match="already quantized: 'model.layers.0.self_attn.q_proj.base_layer'"):
        quantize_base(q, "int8")
    assert_same(snapshot(q), before)
    assert [type(m) for m in q.modules()] == types


def test_merged_adapters_are_refused_unchanged():
    m = adapted(llama())
    lorakit.merge(m)
    before = snapshot(m)
    with pytest.raises(QuantizeError, match="merged into 'model.layers.0.self_attn.q_proj'"):
        quantize_base(m, "nf4")
    assert_same(snapshot(m), before)
    assert not any(is_quantized(x) for x in m.modules())


def test_nothing_to_quantize():
    with pytest.raises(QuantizeError, match="no nn.Linear to quantize"):
        quantize_base(torch.nn.Sequential(torch.nn.Embedding(4, 4)), "nf4")


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    m = llama()
    with pytest.raises(QuantizeError, match=r"pip install 'lorakit\[quant\]'"):
        quantize_base(m, "nf4")
    assert not any(is_quantized(x) for x in m.modules())


# ---- no network ------------------------------------------------------------------------------------------
def test_no_hub_lookup_at_import_or_use():
    """bitsandbytes' CPU backend resolves huggingface.co at import (through `kernels`); through lorakit nothing
    touches a socket and no fallback message is printed, with HF_HUB_OFFLINE unset."""
    script = """
import sys
events = []
sys.addaudithook(lambda ev, args: events.append(ev) if ev.startswith(("socket.", "urllib")) else None)
import torch
from lorakit.quantize import quantize_base
m = quantize_base(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), "nf4")
m(torch.randn(2, 64, requires_grad=True)).sum().backward()
quantize_base(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8")(torch.randn(2, 64))
print("EVENTS", events)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert "EVENTS []" in run.stdout, run.stdout
    assert "kernels-community" not in run.stderr and "MatMul8bitLt" not in run.stderr, run.stderr
