"""The serving benchmark's workload generator and adapter writer (`bench/serve_workloads.py`), and its metrics."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from serve_workloads import (QKVO, Dims, Workload, adapter_bytes, adapter_key, ensure_adapters,  # noqa: E402
                             flop_overhead, gap_stats, generate_requests, write_adapter)

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_same_seed_same_requests_other_seed_differs():
    w = Workload("S1", 16, mode="open", num_requests=50, rate=3.0, alpha=0.5, seed=7)
    a, b = generate_requests(w), generate_requests(w)
    assert [(r.arrival, r.adapter, r.prompt_ids, r.output_len) for r in a] == \
           [(r.arrival, r.adapter, r.prompt_ids, r.output_len) for r in b]
    c = generate_requests(Workload("S1", 16, mode="open", num_requests=50, rate=3.0, alpha=0.5, seed=8))
    assert [r.prompt_ids for r in a] != [r.prompt_ids for r in c]
    assert [r.adapter for r in a] != [r.adapter for r in c]


def test_workloads_with_one_seed_differ_only_in_adapters():
    """N changes the adapter of each request, never its arrival, lengths or prompt (fair comparisons across N)."""
    reqs = {n: generate_requests(Workload("S1", n, mode="open", num_requests=40, seed=3)) for n in (0, 8, 1000)}
    for n in (8, 1000):
        assert [(r.arrival, r.prompt_ids, r.output_len) for r in reqs[n]] == \
               [(r.arrival, r.prompt_ids, r.output_len) for r in reqs[0]]
    assert all(r.adapter is None for r in reqs[0])
    assert [r.adapter for r in reqs[8]] != [r.adapter for r in reqs[1000]]


def test_lengths_and_token_ids_stay_in_their_inclusive_ranges():
    w = Workload("S1", 4, num_requests=3000, input_range=(8, 12), output_range=(3, 5), vocab_size=50,
                 min_token_id=4)
    reqs = generate_requests(w)
    ins = {len(r.prompt_ids) for r in reqs}
    outs = {r.output_len for r in reqs}
    assert ins == set(range(8, 13)) and outs == {3, 4, 5}  # both ends reached
    ids = np.concatenate([r.prompt_ids for r in reqs])
    assert ids.min() == 4 and ids.max() == 49


def test_uniform_popularity_when_alpha_is_one():
    reqs = generate_requests(Workload("S1", 10, num_requests=20000, alpha=1.0, seed=1))
    counts = np.bincount([r.adapter for r in reqs], minlength=10)
    assert len(counts) == 10
    assert np.all(np.abs(counts / 20000 - 0.1) < 0.012), counts


@pytest.mark.parametrize("alpha", [0.3, 0.6])
def test_power_law_popularity_follows_numpy_power(alpha):
    """Adapter = floor(power(alpha) * N): P(adapter < k) = (k / N) ** alpha, so low indices are popular."""
    n_adapters, n = 10, 20000
    reqs = generate_requests(Workload("S1", n_adapters, num_requests=n, alpha=alpha, seed=2))
    adapters = np.array([r.adapter for r in reqs])
    assert adapters.min() >= 0 and adapters.max() <= n_adapters - 1
    for k in (1, 3, 5):
        assert abs(np.mean(adapters < k) - (k / n_adapters) ** alpha) < 0.015
    counts = np.bincount(adapters, minlength=n_adapters)
    assert counts[0] > 3 * counts[-1]


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_open_loop_gaps_have_the_requested_rate_and_cv(cv):
    reqs = generate_requests(Workload("S1", 4, mode="open", num_requests=100_000, rate=5.0, cv=cv, seed=4))
    arrivals = [r.arrival for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    mean, got_cv = gap_stats(reqs)
    assert abs(mean - 0.2) < 0.2 * 0.05
    assert abs(got_cv - cv) < 0.1 * cv


def test_closed_loop_requests_all_arrive_at_zero():
    reqs = generate_requests(Workload("S1", 4, mode="closed", num_requests=30, rate=0.01))
    assert [r.arrival for r in reqs] == [0.0] * 30
    assert [r.index for r in reqs] == list(range(30))


@pytest.mark.parametrize("bad", [dict(mode="poisson"), dict(ranks=()), dict(alpha=0), dict(cv=-1),
                                 dict(input_range=(10, 5)), dict(min_token_id=4096)])
def test_bad_workloads_are_refused(bad):
    with pytest.raises(ValueError):
        Workload("S1", 4, **bad)


def test_flop_overhead_matches_the_cost_model():
    """serving.md §4.1: r (d_in + d_out) / (d_in d_out) per layer; 2r/d for square q/k/v/o."""
    dims = Dims(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=4096)
    f = flop_overhead(dims, 8)
    assert f["adapted_layers"] == pytest.approx(2 * 8 / 1024)
    base = 8 * (4 * 1024 * 1024 + 3 * 1024 * 2816) + 1024 * 4096
    assert f["model"] == pytest.approx(8 * 4 * 8 * 2048 / base)
    assert adapter_bytes(dims, 8) == 4 * 8 * 4 * 8 * 2048  # ≈ 2 MB: S1's adapter size
    gqa = Dims(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=100)
    assert gqa.shape("k_proj") == (64, 32) and gqa.shape("down_proj") == (128, 64)


def tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "model")
    return model, Dims.from_config(cfg)


def test_written_adapters_load_in_peft_without_missing_or_unexpected_keys(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model, dims = tiny_llama(tmp_path)
    targets = QKVO + ("gate_proj", "down_proj")
    nbytes = write_adapter(tmp_path / "a", dims, 4, targets, seed=1, base_model=str(tmp_path / "model"))
    assert nbytes == adapter_bytes(dims, 4, targets)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(tensors) == {adapter_key(i, t, ab) for i in range(2) for t in targets for ab in "AB"}
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)  # GQA
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert all(t.abs().sum() > 0 for t in tensors.values())  # non-zero B
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4

    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    peft = PeftModel.from_pretrained(fresh, str(tmp_path / "a"), adapter_name="first")
    write_adapter(tmp_path / "b", dims, 4, targets, seed=2)
    result = peft.load_adapter(str(tmp_path / "b"), adapter_name="second")
    assert not result.missing_keys and not result.unexpected_keys
    inner = peft.base_model.model.model.layers[1].self_attn.k_proj
    assert torch.equal(inner.lora_B["first"].weight, tensors["base_model.model.model.layers.1.self_attn.k_proj"
                                                                ".lora_B.weight"])
    ids = torch.randint(4, 128, (2, 6))
    with torch.no_grad():
        base, adapted = model(ids).logits, peft(ids).logits
    assert (base - adapted).abs().max() > 1e-3  # the adapter changes the output


def test_ensure_adapters_cycles_ranks_and_reuses_files(tmp_path):
    dims = Dims(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=2, vocab=100)
    w = Workload("S2", 6, ranks=(2, 4, 8))
    paths = ensure_adapters(tmp_path, w, dims, log=None)
    assert [json.loads((p / "adapter_config.json").read_text())["r"] for p in paths] == [2, 4, 8, 2, 4, 8]
    mtimes = [(p / "adapter_model.safetensors").stat().st_mtime_ns for p in paths]
    again = ensure_adapters(tmp_path, Workload("S2", 3, ranks=(2, 4, 8)), dims, log=None)
    assert again == paths[:3]
    assert [(p / "adapter_model.safetensors").stat().st_mtime_ns for p in paths] == mtimes
    other = ensure_adapters(tmp_path, Workload("S1", 2, ranks=(2,)), dims, log=None)
    assert other[0].parent != paths[0].parent


def test_summary_counts_unserved_requests_as_ttft_lower_bounds():
    serve = load_bench_serve()
    reqs = generate_requests(Workload("S1", 2, mode="open", num_requests=4, rate=1.0, output_range=(3, 3)))
    clock = serve.Clock(reqs, max_run_s=100)
    clock.start -= 100  # the run is 100 s old: over its deadline
    clock.deadline -= 100
    for r in reqs[:2]:
        clock.first[r.index], clock.finish[r.index] = r.arrival + 1.0, r.arrival + 3.0
    clock.tokens = 6
    assert clock.over()
    s = serve.summarize(clock)
    assert s["finished"] == 2 and s["stopped_early"] and s["ttft_lower_bound"]
    assert s["latency_mean_s"] == pytest.approx(3.0) and s["tpot_ms"] == pytest.approx(1000.0)
    assert s["ttft_p90_s"] > 90  # the unserved two waited ~100 s - arrival
    assert s["tokens_per_s"] == pytest.approx(6 / (s["elapsed_s"]))


def load_bench_serve():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("system", ["ours", "base", "hf-base", "peft-seq", "peft-mixed"])
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_every_system_serves_a_tiny_workload(tmp_path, system, mode):
    """Each system's driver finishes every request, counts exactly the requested tokens, and (open loop) never
    gives a request its first token before it arrived."""
    import dataclasses

    serve = load_bench_serve()
    _, dims = tiny_llama(tmp_path)
    n = 0 if system in ("base", "hf-base") else 3
    w = Workload("S1" if n else "base", n, ranks=(4, 8), mode=mode, num_requests=6, rate=40.0,
                 input_range=(3, 9), output_range=(1, 5), vocab_size=dims.vocab)
    paths = ensure_adapters(tmp_path, w, dims, log=None)
    cell = {"id": "t", "system": system, "workload": dataclasses.asdict(w), "adapters": [str(p) for p in paths],
            "model_dir": str(tmp_path / "model"), "batch": 4, "max_loras": 4, "max_cpu_loras": 2, "engine_opts": {},
            "threads": 1, "max_run_s": 60}
    res = serve.run_cell(cell)
    reqs = generate_requests(w)
    assert res["finished"] == 6 and not res["stopped_early"] and not res["ttft_lower_bound"]
    assert res["generated_tokens"] == sum(r.output_len for r in reqs)
    assert 0 < res["ttft_p50_s"] <= res["ttft_p90_s"] and res["ttft_mean_s"] <= res["latency_mean_s"]
    assert res["peak_rss_bytes"] > 0
    if system == "ours":
        assert res["engine_metrics"]["adapter_cache_misses_total"] >= 1 and "cold_load_ms" in res
        assert res["engine_config"]["max_cpu_loras"] == 2  # N = 3 > 2: the RAM cache is capped below N
