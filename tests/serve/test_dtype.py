"""Serving in bf16 (`EngineConfig.dtype`, `lorakit serve --dtype`) and the model name `smollm2`.

bf16 tolerance, stated once: logits of the bf16 engine are within 4e-2 · max|fp32 logit| of transformers' (and
PEFT's) bf16 model — about 10 bf16 ulps (2^-8 relative) at the logit scale — and their error against the fp32
model is at most 2× transformers' bf16 error + 1e-3 (PEFT computes the LoRA add-on in fp32, we in bf16).
"""
import asyncio
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fake_engine import tiny_model_dir
from lorakit import kernels
from lorakit.errors import ConfigError
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.config import serving_dtype
from lorakit.serve.llama import LlamaRunner

pytestmark = pytest.mark.usefixtures("one_thread_module")
CFG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)
REL_TOL = 4e-2


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A PEFT LoRA on all linear layers with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           init_lora_weights=False))
    path = tmp_path_factory.mktemp("bf16") / "a"
    model.save_pretrained(str(path))
    return str(path)


def reference(base, adapter, request, dtype):
    """Teacher-forced logits of transformers (+ PEFT for an adapter) in `dtype` at the request's output positions."""
    from peft import PeftModel

    model = copy.deepcopy(base).to(dtype)
    if request.adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(torch.tensor([request.all_ids])).logits[0].float()
    return logits[len(request.prompt_ids) - 1:len(request.all_ids) - 1]


def held_in_bf16(loaded) -> bool:
    """Every factor of a loaded adapter (A and each (s·B)ᵀ) is a bf16 tensor."""
    return all(w.a.dtype == torch.bfloat16 and all(p[4].dtype == torch.bfloat16 for p in w.parts)
               for w in loaded.groups.values())


@pytest.mark.parametrize("dtype, fp32_max_rows", [("bfloat16", 0), ("bfloat16", 4), ("float16", 0)])
def test_16bit_engine_logits_match_transformers_16bit(base, adapter, dtype, fp32_max_rows):
    """bf16 (and fp16, with the same bound) against transformers + PEFT in that dtype."""
    engine = Engine(LlamaRunner.from_hf(base, dtype), EngineConfig(
        memory_bytes=1 << 24, block_size=4, load_workers=0, fp32_max_rows=fp32_max_rows))
    half = getattr(torch, dtype)
    assert engine.model.layers[0]["qkv"].dtype == half and engine.cache.k[0].dtype == half
    engine.register_adapter("a", adapter)
    g = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(256, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist(),
                        name, SamplingParams(max_tokens=8, ignore_eos=True, record_logits=True))
                for name in (None, "a", None, "a")]
    engine.generate(requests[:2])  # two at a time: prefill steps in bf16, decode steps of 2 rows (fp32 if <= 4)
    engine.generate(requests[2:])
    for r in requests:
        mine = torch.stack(r.logits)
        ref16, ref32 = reference(base, adapter, r, half), reference(base, adapter, r, torch.float32)
        scale = ref32.abs().max()
        err16, ours = (ref16 - ref32).abs().max() / scale, (mine - ref32).abs().max() / scale
        assert (mine - ref16).abs().max() / scale <= REL_TOL, (r.adapter, (mine - ref16).abs().max() / scale)
        assert ours <= 2 * err16 + 1e-3, (r.adapter, ours, err16)
        assert 0 < ours  # 16 bits, not fp32 in disguise


def test_bf16_greedy_agrees_with_fp32_until_a_near_tie(base, adapter):
    """Greedy bf16 tokens equal fp32's, or first differ where fp32's top-2 logits are within the bf16 tolerance."""
    engines = {dt: Engine(LlamaRunner.from_hf(base, dt), EngineConfig(memory_bytes=1 << 24, load_workers=0))
               for dt in ("float32", "bfloat16")}
    outputs = {}
    for dt, engine in engines.items():
        engine.register_adapter("a", adapter)
        reqs = [Request([1, 17, 42, 99, 3, 250, 7], name, SamplingParams(max_tokens=12, ignore_eos=True,
                                                                           record_logits=True))
                for name in (None, "a")]
        outputs[dt] = engine.generate(reqs)
    for r32, r16 in zip(outputs["float32"], outputs["bfloat16"]):
        diff = [i for i, (a, b) in enumerate(zip(r32.output_ids, r16.output_ids)) if a != b]
        if diff:
            row = r32.logits[diff[0]]
            top2 = row.topk(2).values
            assert top2[0] - top2[1] <= REL_TOL * row.abs().max(), (r32.adapter, diff[0])


def test_dtype_setting_auto_and_errors(base):
    assert serving_dtype("auto", torch.float32) is torch.float32
    assert serving_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert serving_dtype("auto", None) is torch.float32
    assert serving_dtype("bfloat16", torch.float32) is torch.bfloat16
    with pytest.raises(ConfigError):
        EngineConfig(dtype="bf16")
    with pytest.raises(ConfigError):
        EngineConfig(fp32_max_rows=-1)
    with pytest.raises(ConfigError, match="lora_dtype"):
        EngineConfig(lora_dtype="bf16")
    runner = LlamaRunner.from_hf(base)  # auto: the checkpoint's dtype
    assert runner.dtype is torch.float32
    assert LlamaRunner.from_hf(copy.deepcopy(base).to(torch.bfloat16)).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        Engine(runner, EngineConfig(dtype="bfloat16"))


def test_bf16_halves_kv_and_adapter_bytes(base, adapter):
    e32 = Engine(LlamaRunner.from_hf(base, "float32"), EngineConfig(memory_bytes=1 << 24, load_workers=0))
    e16 = Engine(LlamaRunner.from_hf(base, "bfloat16"), EngineConfig(memory_bytes=1 << 24, load_workers=0,
                                                                      fp32_max_rows=0))
    assert e16.block_bytes * 2 == e32.block_bytes and e16.cache.pool.num_blocks == 2 * e32.cache.pool.num_blocks
    assert e16.model.weight_bytes() * 2 == e32.model.weight_bytes()
    for e in (e32, e16):
        e.register_adapter("a", adapter)
        e.generate([Request([1, 2, 3], "a", SamplingParams(max_tokens=1))])
    spec16, spec32 = e16.pool.specs()["a"], e32.pool.specs()["a"]
    assert spec16.nbytes * 2 == spec32.nbytes
    assert e16.pool.resident_bytes() * 2 == e32.pool.resident_bytes()
    assert held_in_bf16(e16.pool.acquire("a"))


@pytest.mark.parametrize("kernel", ["fused", "segment", "bmm"])
def test_bf16_adapters_on_an_fp32_model(base, adapter, kernel):
    """`lora_dtype="bfloat16"`: adapters held in bf16 (half the bytes, counted so by the pool), and the logits equal
    PEFT's fp32 model whose factors were rounded the same way (A, and s·B after scaling) — nothing else rounds."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if kernel == "fused" and kernels.sgmv() is None:
        pytest.skip("no compiled kernels")
    engines = {ld: Engine(LlamaRunner.from_hf(base, "float32"), EngineConfig(
        memory_bytes=1 << 24, block_size=4, load_workers=0, lora_kernel=kernel, lora_dtype=ld))
        for ld in ("auto", "bfloat16")}
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (5, 17, 9)]
    logits = {}
    for ld, engine in engines.items():
        engine.register_adapter("a", adapter)
        reqs = [Request(p, "a", SamplingParams(max_tokens=6, ignore_eos=True, record_logits=True)) for p in prompts]
        engine.generate(reqs)
        logits[ld] = reqs
    e16, e32 = engines["bfloat16"], engines["auto"]
    assert e16.pool.specs()["a"].nbytes * 2 == e32.pool.specs()["a"].nbytes
    assert held_in_bf16(e16.pool.acquire("a"))
    assert e16.model.layers[0]["qkv"].dtype == torch.float32

    rounded = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, LoraLayer):
                s = m.scaling["default"]
                m.lora_A["default"].weight.copy_(m.lora_A["default"].weight.bfloat16().float())
                m.lora_B["default"].weight.copy_((m.lora_B["default"].weight * s).bfloat16().float() / s)
    for r16, r32 in zip(logits["bfloat16"], logits["auto"]):
        with torch.no_grad():
            ref = rounded(torch.tensor([r16.all_ids])).logits[0]
        ref = ref[len(r16.prompt_ids) - 1:len(r16.all_ids) - 1]
        mine, scale = torch.stack(r16.logits), ref.abs().max()
        assert len(r16.logits) == 6 and (mine - ref).abs().max() / scale <= 1e-4
        drift = (mine[0] - r32.logits[0]).abs().max() / scale  # first position: the same input in both engines
        assert 1e-3 < drift <= REL_TOL, drift  # the factors really are rounded (10× the tolerance above), a little


def test_serve_accepts_the_name_smollm2(monkeypatch):
    """`lorakit serve smollm2 --dtype bfloat16` resolves the name through lorakit.models.smollm2_dir (here
    pointed at the tiny test model, so no download) and serves it under the name smollm2."""
    import httpx

    import lorakit.models
    from lorakit.cli import main
    from lorakit.serve import server

    monkeypatch.setattr(lorakit.models, "smollm2_dir", lambda: str(tiny_model_dir()))
    apps = []
    monkeypatch.setattr(server, "run_server", lambda app, sock, **kwargs: apps.append(app))
    assert main(["serve", "smollm2", "--dtype", "bfloat16", "--memory-gb", "0.05", "--port", "0"]) == 0

    async def ask(app):
        async with app.router.lifespan_context(app):  # shuts the engine thread down on exit
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                models = (await client.get("/v1/models")).json()["data"]
                chat = await client.post("/v1/chat/completions", json={
                    "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "temperature": 0})
                return models, chat
    models, chat = asyncio.run(ask(apps[0]))
    assert models[0]["id"] == "smollm2" and models[0]["root"] == str(tiny_model_dir().absolute())
    assert chat.status_code == 200, chat.text
    assert main(["serve", "smollm2", "--dtype", "bf16"]) == 2


def test_serve_passes_lora_dtype(monkeypatch):
    from lorakit.cli import main
    from lorakit.serve import server

    configs = []
    monkeypatch.setattr(server, "serve", lambda *args, engine_config, **kwargs: configs.append(engine_config))
    assert main(["serve", str(tiny_model_dir()), "--lora-dtype", "bfloat16"]) == 0
    assert main(["serve", str(tiny_model_dir())]) == 0
    assert [c.lora_dtype for c in configs] == ["bfloat16", "auto"]
    assert main(["serve", str(tiny_model_dir()), "--lora-dtype", "bf16"]) == 2
