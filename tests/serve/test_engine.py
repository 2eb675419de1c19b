"""The serving engine against transformers and PEFT: logits at every generated position, under continuous batching,
mixed adapters of mixed ranks and targets, the max_loras cap, and preemption forced by a small KV memory."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import kernels
from lorakit.errors import CapacityError, QueueFullError, RequestError, UnknownAdapterError
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.llama import LlamaRunner
from lorakit.serve.lora import LoraStep

CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def peft_adapter(base, directory, rank, targets, seed, alpha=None):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False: A and B both random, B non-zero
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha or 2 * rank,
                                                           target_modules=targets, init_lora_weights=False))
    model.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """32 PEFT adapters: ranks 8-64, half on q/k/v/o, half on all linear layers (one with rsLoRA-like alpha)."""
    root = tmp_path_factory.mktemp("adapters")
    ranks = [8, 16, 32, 64]
    return {f"ad{i}": (peft_adapter(base, root / f"ad{i}", ranks[i % 4], QKVO if i % 2 else "all-linear", 100 + i),
                       ranks[i % 4]) for i in range(32)}


def reference_logits(base, adapters, requests):
    """PEFT's teacher-forced logits of each request's whole sequence, with its adapter alone."""
    from peft import PeftModel

    by_adapter = {}
    for r in requests:
        by_adapter.setdefault(r.adapter, []).append(r)
    out = {}
    for name, reqs in by_adapter.items():
        model = base if name is None else PeftModel.from_pretrained(copy.deepcopy(base), adapters[name][0]).eval()
        with torch.no_grad():
            for r in reqs:
                full = model(torch.tensor([r.all_ids])).logits[0]
                out[r.request_id] = full[len(r.prompt_ids) - 1:len(r.all_ids) - 1]
    return out


def check_against(reference, requests):
    for r in requests:
        assert r.finish_reason == "length", (r.request_id, r.finish_reason, r.error)
        mine, ref = torch.stack(r.logits), reference[r.request_id]
        rel = ((mine - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-4, (r.request_id, r.adapter, rel)
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(ref.argmax(-1)[clear], torch.tensor(r.output_ids)[clear])


def make_requests(n, names, seed, max_tokens=(4, 12)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 40, (1,), generator=g))
        steps = int(torch.randint(*max_tokens, (1,), generator=g))
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        out.append(Request(torch.randint(CFG["vocab_size"], (length,), generator=g).tolist(), name,
                           SamplingParams(max_tokens=steps, ignore_eos=True, record_logits=True)))
    return out


@pytest.mark.parametrize("kernel", ["auto", "fused", "segment", "bmm"])
def test_engine_matches_peft_for_32_adapters_under_preemption(base, adapters, kernel, monkeypatch):
    compiled = kernels.sgmv() is not None
    if kernel == "fused" and not compiled:
        pytest.skip("the compiled kernels are off (LORAKIT_KERNELS=eager or no compiler)")
    config = EngineConfig(memory_bytes=900 * 1024, block_size=4, max_num_seqs=16, max_loras=8,
                          max_num_batched_tokens=160, lora_kernel=kernel, bmm_min_adapters=2, load_workers=0)
    engine = Engine(LlamaRunner.from_hf(base), config)
    for name, (path, _) in adapters.items():
        engine.register_adapter(name, path)
    distinct_per_step, bmm_calls, fused_calls = [], [], []
    real_init, real_bmm, real_fused = LoraStep.__init__, LoraStep._bmm, LoraStep._fused

    def spy_init(self, segments, *args, **kwargs):
        distinct_per_step.append(len({id(s.adapter) for s in segments}))
        real_init(self, segments, *args, **kwargs)

    def spy_bmm(self, bucket, *args):
        ran = real_bmm(self, bucket, *args)
        if ran:
            bmm_calls.append(len(bucket))
        return ran

    monkeypatch.setattr(LoraStep, "__init__", spy_init)
    monkeypatch.setattr(LoraStep, "_bmm", spy_bmm)
    monkeypatch.setattr(LoraStep, "_fused", lambda self, *a: fused_calls.append(1) or real_fused(self, *a))
    names = [None] + list(adapters)
    requests = make_requests(70, names, seed=1)
    for r in requests[:40]:  # continuous batching: the rest arrive while these run
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    for r in requests[40:]:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    metrics = engine.metrics()
    assert metrics["preemptions_total"] > 0 and metrics["kv_blocks_used"] == 0
    assert max(distinct_per_step) <= config.max_loras and max(distinct_per_step) >= 2
    fused = kernel == "fused" or (kernel == "auto" and compiled)
    assert (len(fused_calls) > 0) == fused
    assert (len(bmm_calls) > 0) == (kernel == "bmm" or (kernel == "auto" and not compiled))
    check_against(reference_logits(base, adapters, requests), requests)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_runner_matches_transformers_for_other_architectures(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **CFG, sliding_window=None)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # q/k/v biases must be used
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    engine = Engine(LlamaRunner.from_hf(model), EngineConfig(memory_bytes=1 << 20, block_size=4))
    requests = make_requests(6, [None], seed=2)
    engine.generate(requests)
    check_against(reference_logits(model, {}, requests), requests)


def test_engine_reads_a_model_directory(base, tmp_path):
    base.save_pretrained(tmp_path / "m")
    engine = Engine.from_dir(tmp_path / "m", EngineConfig(memory_bytes=1 << 20))
    assert engine.model_name == "m" and engine.max_model_len == CFG["max_position_embeddings"]
    requests = make_requests(3, [None], seed=4)
    engine.generate(requests)
    check_against(reference_logits(base, {}, requests), requests)


def test_bad_requests_are_refused_and_change_nothing(base, adapters):
    engine = Engine(LlamaRunner.from_hf(base), EngineConfig(memory_bytes=64 * 1024, block_size=4, max_waiting=2))
    with pytest.raises(RequestError) as e:
        engine.add_request(Request([]))
    assert e.value.field == "prompt"
    with pytest.raises(RequestError):
        engine.add_request(Request([1, CFG["vocab_size"]]))
    with pytest.raises(UnknownAdapterError):
        engine.add_request(Request([1, 2], adapter="nope"))
    with pytest.raises(CapacityError, match="context length"):
        engine.add_request(Request([1] * 100, params=SamplingParams(max_tokens=29)))
    with pytest.raises(RequestError) as e:
        SamplingParams(top_p=0)
    assert e.value.field == "top_p"
    engine.add_request(Request([1, 2]))
    engine.add_request(Request([1, 2]))
    with pytest.raises(QueueFullError):
        engine.add_request(Request([1, 2]))
    assert engine.metrics()["waiting"] == 2


def test_stop_tokens_abort_and_seeded_sampling(base):
    engine = Engine(LlamaRunner.from_hf(base), EngineConfig(memory_bytes=1 << 20, block_size=4))
    probe = Request([5, 6, 7], params=SamplingParams(max_tokens=6, ignore_eos=True))
    engine.generate([probe])
    stop_at = probe.output_ids[2]
    stopped = Request([5, 6, 7], params=SamplingParams(max_tokens=6, stop_token_ids=(stop_at,), ignore_eos=True))
    engine.generate([stopped])
    assert stopped.finish_reason == "stop" and stopped.output_ids == probe.output_ids[:probe.output_ids.index(stop_at) + 1]

    def sampled(seed, top_p=0.9):
        r = Request([5, 6, 7], params=SamplingParams(max_tokens=12, temperature=1.5, top_p=top_p, seed=seed, ignore_eos=True))
        return engine.generate([r])[0].output_ids

    assert sampled(1) == sampled(1) and sampled(1) != sampled(2)
    greedy = engine.generate([Request([5, 6, 7], params=SamplingParams(max_tokens=12, ignore_eos=True))])[0]
    assert sampled(3, top_p=1e-6) == greedy.output_ids  # only the most likely token survives the nucleus
    tiny = Request([5, 6, 7], params=SamplingParams(max_tokens=12, temperature=5e-324, ignore_eos=True))
    assert engine.generate([tiny])[0].output_ids == greedy.output_ids  # a tiny temperature is greedy, never NaN

    long = Request([1, 2, 3], params=SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request(long)
    engine.step()
    assert engine.metrics()["kv_blocks_used"] > 0
    out = engine.abort(long.request_id)
    assert out.finish_reason == "abort" and long.finish_reason == "abort"
    assert engine.metrics()["kv_blocks_used"] == 0


def test_cold_adapter_loads_without_blocking_other_requests(base, adapters, monkeypatch):
    import time

    from lorakit.serve import adapters as pool_module

    real = pool_module.load_adapter_weights

    def slow(spec, dims, *dtype):
        time.sleep(0.5)
        return real(spec, dims, *dtype)

    monkeypatch.setattr(pool_module, "load_adapter_weights", slow)
    engine = Engine(LlamaRunner.from_hf(base), EngineConfig(memory_bytes=4 << 20, block_size=4))
    engine.register_adapter("ad0", adapters["ad0"][0])
    cold = Request([1, 2, 3], "ad0", SamplingParams(max_tokens=2, ignore_eos=True))
    warm = Request([4, 5, 6], None, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.generate([cold, warm])
    assert warm.finish_time < cold.first_token_time  # the base request ran while the adapter was read
    assert engine.metrics()["adapter_cache_misses_total"] == 1


def test_adapter_cache_is_lru_in_count_and_bytes_and_never_evicts_a_running_adapter(base, adapters):
    names = ["ad1", "ad3", "ad5"]  # q/k/v/o adapters of ranks 16, 64, 16
    engine = Engine(LlamaRunner.from_hf(base), EngineConfig(memory_bytes=4 << 20, block_size=4, max_cpu_loras=2,
                                                            max_loras=2))
    for n in names:
        engine.register_adapter(n, adapters[n][0])
    engine.generate([Request([1, 2], "ad1", SamplingParams(max_tokens=2))])
    running = Request([1, 2, 3], "ad1", SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request(running)
    engine.step()  # ad1 is now pinned by a running request
    engine.generate([Request([1, 2], "ad3", SamplingParams(max_tokens=2)),
                     Request([1, 2], "ad5", SamplingParams(max_tokens=2))])
    m = engine.metrics()
    assert m["adapter_evictions_total"] >= 1 and m["adapters_loaded"] <= 2
    assert engine.pool._entries["ad1"].loaded is not None  # the running request's adapter stayed
    assert running.finish_reason == "length" and running.error is None
    # a byte budget that holds the KV of one request plus one adapter evicts idle adapters for KV blocks
    spec = engine.pool.specs()["ad3"]
    tight = Engine(LlamaRunner.from_hf(base), EngineConfig(memory_bytes=spec.nbytes + 25 * engine.block_bytes,
                                                           block_size=4))
    tight.register_adapter("ad3", adapters["ad3"][0])
    tight.generate([Request([1, 2], "ad3", SamplingParams(max_tokens=2))])
    assert tight.metrics()["adapters_loaded"] == 1
    tight.generate([Request([1] * 80, None, SamplingParams(max_tokens=40, ignore_eos=True))])  # 30 blocks
    assert tight.metrics()["adapters_loaded"] == 0 and tight.metrics()["adapter_evictions_total"] == 1


def tensors_in(obj):
    """Every tensor inside `obj`: group weights (and the copies they keep), lists, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif hasattr(obj, "parts"):  # GroupWeights
        yield from tensors_in([obj.at, obj.parts, obj._casts])
    elif isinstance(obj, (list, tuple, dict)):
        for item in obj.values() if isinstance(obj, dict) else obj:
            yield from tensors_in(item)


def held_bytes(loaded) -> int:
    """The bytes of every distinct storage a loaded adapter keeps (its factors and any copies made of them)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_in(loaded.groups)}
    return sum(storages.values())


@pytest.mark.parametrize("kernel", ["auto", "segment"])
def test_the_pool_counts_the_bytes_a_served_adapter_holds(base, adapters, tmp_path, kernel):
    """The budget's count of an adapter (known before it loads) is what it holds once steps have run with it:
    rank 3 on every projection (q/k/v's Aᵀ padded from 9 to 16 ranks) and rank 64 on q/k/v/o."""
    odd = peft_adapter(base, tmp_path / "r3", 3, "all-linear", seed=7)
    engine = Engine(LlamaRunner.from_hf(base), EngineConfig(memory_bytes=8 << 20, block_size=4, lora_kernel=kernel))
    engine.register_adapter("r3", odd)
    engine.register_adapter("r64", adapters["ad3"][0])
    engine.generate([Request([1, 2, 3], name, SamplingParams(max_tokens=3, ignore_eos=True)) for name in
                     ("r3", "r64", "r3")])
    for name in ("r3", "r64"):
        loaded = engine.pool._entries[name].loaded
        assert loaded.nbytes == engine.pool.specs()[name].nbytes == held_bytes(loaded)


def test_runner_logits_at_every_prefill_position_match_transformers(base):
    """Two prompts prefilled in one step (all positions' logits), then a decode step of both."""
    from lorakit.serve.llama import SeqSlice, StepBatch

    runner = LlamaRunner.from_hf(base)
    cache = runner.new_cache(num_blocks=32, block_size=4)
    prompts = [[5, 17, 9, 33, 2, 8, 1], [40, 41, 42]]
    tokens, positions, seqs = [], [], []
    for i, p in enumerate(prompts):
        cache.pool.grow(f"s{i}", len(p))
        seqs.append(SeqSlice(len(tokens), len(tokens) + len(p), len(p), cache.pool.slots(f"s{i}", 0, len(p))))
        tokens += p
        positions += range(len(p))
    every = torch.arange(len(tokens))
    logits = runner.step(StepBatch(torch.tensor(tokens), torch.tensor(positions), seqs, logits_rows=every), cache)
    with torch.no_grad():
        ref = torch.cat([base(torch.tensor([p])).logits[0] for p in prompts])
    assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    nxt = [int(logits[s.stop - 1].argmax()) for s in seqs]
    seqs = []
    for i, (p, t) in enumerate(zip(prompts, nxt)):
        p.append(t)
        cache.pool.grow(f"s{i}", len(p))
        seqs.append(SeqSlice(i, i + 1, len(p), cache.pool.slots(f"s{i}", 0, len(p))))
    logits = runner.step(StepBatch(torch.tensor(nxt), torch.tensor([len(p) - 1 for p in prompts]), seqs), cache)
    with torch.no_grad():
        ref = torch.stack([base(torch.tensor([p])).logits[0, -1] for p in prompts])
    assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
