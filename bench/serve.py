"""Multi-adapter serving: lorakit's Engine vs the base model alone vs PEFT (S-LoRA-style workloads, CPU).

Usage: `.venv/bin/python bench/serve.py [--quick] [--dry-run] [--workloads S1,S2] [--n 1,8,32,128,1000]
[--requests 64] [--mode both|closed|open] [--systems ours,base,hf-base,peft-seq,peft-mixed] [--out out/serve_bench]
[--resume] [--engine-opt lora_kernel=segment]` (`--help` lists the rest).
`bench/serve.py --dtype-compare [--concurrency 1,32] [--rounds 5]`: SmolLM2-135M-Instruct in bf16 vs fp32, with and
without adapters (`bench/serve_dtype.py`, its own BENCHMARKS.md section).

Model: a random-weight Llama directory (`lorakit.serve.model_dir.make_model`, hidden 1024, 8 layers, vocab 4096).
Workloads (`bench/serve_workloads.py`): S1 = N adapters of rank 8 on q/k/v/o; S2 = ranks {8,16,32,64} cycled over
the adapters. Requests: power-law adapter popularity, input U[8,128] and output U[8,64] tokens, random prompt ids,
greedy, fixed output length (ignore EOS). Closed loop = every request at t=0 (throughput); open loop = Gamma
arrivals at a rate below our saturation point (TTFT).

Systems, all with at most `--batch` requests in flight:
- `ours`: `lorakit.serve.engine.Engine` (continuous batching, paged KV cache, adapter pool);
- `base`: the same Engine with every request on the base model (the upper bound), and `hf-base`: HF `generate`
  on the base model with static batches (reference);
- `peft-seq`: PEFT, queued requests grouped by adapter, one static left-padded batch per group, `set_adapter`
  between groups (S-LoRA's PEFT baseline); `peft-mixed`: PEFT `generate(adapter_names=[...])` on static FCFS
  batches. PEFT only at N in --peft-n (S1: 8 and 32) and --peft-n-s2 (32); it holds every adapter in the model.
Static baselines see arrivals honestly: a batch is formed from requests that have arrived when it starts. Their
first-token and finish times are taken per request from a streamer (a request's finish is the step that produced
its last token, not the end of its batch: favourable to the baselines).

Each cell runs in its own subprocess (clean peak RSS) and stops after --max-run-s (80 s; tokens/s and req/s are
then over that window), so the default run (19 cells) takes about 20-30 min on 2 cores. Adapters (~3 GB for
S1 N=1000 + S2) and cell results are kept under --out; --resume reuses cells whose settings did not change.
Prints tables, writes `<out>/serve_results.json`, the `serve` section of BENCHMARKS.md and
docs/serve_throughput.png (not with --quick).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_workloads import (QKVO, Dims, RequestSpec, Workload, ensure_adapters, flop_overhead,  # noqa: E402
                             generate_requests, mean_request_rank)

ROOT = Path(__file__).resolve().parent.parent
FULL_MODEL = dict(hidden_size=1024, num_layers=8, vocab_size=4096, max_position_embeddings=512, seed=0)
QUICK_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=512,
                   max_position_embeddings=128, seed=0)
SYSTEMS = ("ours", "base", "hf-base", "peft-seq", "peft-mixed")
LABELS = {"ours": "lorakit Engine", "base": "base alone (Engine)", "hf-base": "base alone (HF generate)",
          "peft-seq": "PEFT per-adapter batches", "peft-mixed": "PEFT mixed batch (adapter_names)"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- model -----------------------------------------------------------------------------------------------------
def ensure_model(path: Path, spec: dict) -> Path:
    """A random-weight Llama dir at `path` (made once; a stamp records the arguments)."""
    stamp = path.parent / (path.name + ".args.json")
    if path.exists() and (path / "config.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return path
    if path.exists():
        import shutil

        shutil.rmtree(path)
    log(f"writing model {path} {spec}")
    try:
        from lorakit.serve.model_dir import make_model
    except ImportError:  # the lead's model_dir module is missing: a plain transformers Llama with seeded weights
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        h = spec["hidden_size"]
        heads = spec.get("num_heads", max(1, h // 64))
        cfg = LlamaConfig(hidden_size=h, intermediate_size=spec.get("intermediate_size", 2816),
                          num_hidden_layers=spec["num_layers"], num_attention_heads=heads, num_key_value_heads=heads,
                          vocab_size=spec["vocab_size"], max_position_embeddings=spec["max_position_embeddings"],
                          tie_word_embeddings=False)
        torch.manual_seed(spec["seed"])
        LlamaForCausalLM(cfg).save_pretrained(path)
    else:
        make_model(path, arch="llama", **spec)
    stamp.write_text(json.dumps(spec))
    return path


def model_dims(model_dir: Path) -> Dims:
    return Dims.from_config(json.loads((model_dir / "config.json").read_text()))


# ---- measurement helpers ---------------------------------------------------------------------------------------
class RssSampler:
    """Peak RSS of this process, sampled with psutil every `period` seconds on a daemon thread."""

    def __init__(self, period: float = 0.05):
        import psutil

        self.proc, self.period, self.peak = psutil.Process(), period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class Clock:
    """Wall clock of one run: t = 0 at start; request i arrives at start + arrival_i."""

    def __init__(self, reqs: list[RequestSpec], max_run_s: float):
        self.start = time.perf_counter()
        self.deadline = self.start + max_run_s
        self.reqs = reqs
        self.first: dict[int, float] = {}
        self.finish: dict[int, float] = {}
        self.tokens = 0
        self.stopped_early = False
        self._last_log = self.start

    def now(self) -> float:
        return time.perf_counter() - self.start

    def wait_until(self, t: float) -> None:
        dt = t - self.now()
        if dt > 0:
            time.sleep(dt)

    def progress(self, label: str) -> None:
        if time.perf_counter() - self._last_log >= 15:
            self._last_log = time.perf_counter()
            log(f"    {label}: {len(self.finish)}/{len(self.reqs)} done, {self.tokens} tokens, {self.now():.0f} s")

    def over(self) -> bool:
        if time.perf_counter() > self.deadline:
            self.stopped_early = True
        return self.stopped_early


def summarize(clock: Clock) -> dict:
    """Throughput and latency of one run. Requests that arrived but got no token before the run stopped at
    --max-run-s count with the lower bound stop - arrival for TTFT, and `ttft_lower_bound` says so."""
    reqs, first, finish = clock.reqs, clock.first, clock.finish
    end = max(finish.values(), default=clock.now()) if not clock.stopped_early else clock.now()
    t0 = min(r.arrival for r in reqs)
    elapsed = max(end - t0, 1e-9)
    arrived = [r for r in reqs if r.arrival <= end]  # a stopped open-loop run never sent the later requests
    ttft = [first[r.index] - r.arrival if r.index in first else end - r.arrival for r in arrived]
    lat = [finish[r.index] - r.arrival for r in reqs if r.index in finish]
    tpot = [(finish[r.index] - first[r.index]) / (r.output_len - 1) for r in reqs
            if r.index in finish and r.output_len > 1]
    return {
        "requests": len(reqs), "finished": len(finish), "elapsed_s": elapsed, "generated_tokens": clock.tokens,
        "tokens_per_s": clock.tokens / elapsed, "req_per_s": len(finish) / elapsed,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
        "ttft_mean_s": float(np.mean(ttft)), "ttft_lower_bound": len(first) < len(arrived),
        "latency_mean_s": float(np.mean(lat)) if lat else math.nan,
        "tpot_ms": 1e3 * float(np.mean(tpot)) if tpot else math.nan, "stopped_early": clock.stopped_early,
    }


# ---- ours: the lorakit Engine ----------------------------------------------------------------------------------
def run_engine(cell: dict, reqs: list[RequestSpec], paths: list[Path]) -> dict:
    """Drive `Engine.step()` from one thread: add requests as they arrive, record first-token and finish times."""
    from lorakit.serve.config import EngineConfig
    from lorakit.serve.engine import Engine
    from lorakit.serve.request import Request, SamplingParams

    n = len(paths)
    opts = dict(max_loras=max(1, min(cell["max_loras"], n)), max_num_seqs=cell["batch"],
                max_waiting=max(1024, 2 * len(reqs)))
    if cell["max_cpu_loras"] and n > cell["max_cpu_loras"]:
        opts["max_cpu_loras"] = cell["max_cpu_loras"]
        opts["max_loras"] = min(opts["max_loras"], cell["max_cpu_loras"])
    opts.update(cell.get("engine_opts", {}))
    out: dict = {"engine_config": opts}
    t = time.perf_counter()
    engine = Engine.from_dir(cell["model_dir"], EngineConfig(**opts))
    out["model_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for i, p in enumerate(paths):
        engine.register_adapter(f"a{i}", str(p))
    out["register_s"] = time.perf_counter() - t
    out["register_ms_per_adapter"] = 1e3 * out["register_s"] / n if n else math.nan

    def run_to_end(batch: list[Request]) -> dict[str, float]:
        """Closed loop for a few requests (warm-up, probes); returns request id -> TTFT (s)."""
        t0 = time.perf_counter()
        ttft, pending = {}, {r.request_id for r in batch}
        for r in batch:
            engine.add_request(r)
        while pending:
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                if o.new_token_ids and o.request_id not in ttft:
                    ttft[o.request_id] = now - t0
                if o.finished:
                    pending.discard(o.request_id)
            if not outs:
                time.sleep(0.0005)
        return ttft

    prompt = list(range(4, 4 + min(48, engine.max_model_len // 2)))
    greedy = lambda k: SamplingParams(max_tokens=k, ignore_eos=True)  # noqa: E731
    if n:  # warm-up on the base and on an extra adapter name (keeps the benchmark's adapters cold)
        engine.register_adapter("warmup", str(paths[0]))
    run_to_end([Request(prompt, None, greedy(4))] + ([Request(prompt, "warmup", greedy(4))] if n else []))

    clock = Clock(reqs, cell["max_run_s"])
    rid = {}
    todo = list(reqs)
    with RssSampler() as rss:
        while (todo or engine.has_work()) and not clock.over():
            now = clock.now()
            while todo and todo[0].arrival <= now:
                r = todo.pop(0)
                req = Request(list(r.prompt_ids), None if r.adapter is None else f"a{r.adapter}",
                              greedy(r.output_len), request_id=f"r{r.index}")
                rid[req.request_id] = r.index
                engine.add_request(req)
            if not engine.has_work():
                clock.wait_until(todo[0].arrival)
                continue
            outs = engine.step()
            now = clock.now()
            for o in outs:
                i = rid.get(o.request_id)
                if i is None:
                    continue
                if o.new_token_ids:
                    clock.tokens += len(o.new_token_ids)
                    clock.first.setdefault(i, now)
                if o.finished:
                    clock.finish[i] = now
                    if o.finish_reason not in ("length", "stop"):
                        raise RuntimeError(f"request r{i} ended with {o.finish_reason}: {o.error}")
            if not outs:
                time.sleep(0.0005)
            clock.progress(cell["id"])
    out.update(summarize(clock))
    out["peak_rss_bytes"] = rss.peak
    out["engine_metrics"] = {k: float(v) for k, v in engine.metrics().items()}
    loads = list(getattr(getattr(engine, "pool", None), "load_ms", []) or [])  # the pool's own load timings
    if loads:  # submit -> collected by the scheduler, for every cold load of the run
        out.update(pool_loads=len(loads), pool_load_ms_p50=float(np.percentile(loads, 50)),
                   pool_load_ms_p90=float(np.percentile(loads, 90)))
    for req_id, i in rid.items():  # a run stopped at --max-run-s: free the engine for the probes
        if i not in clock.finish:
            engine.abort(req_id)
    while engine.has_work():
        engine.step()
    if n:
        out.update(cold_probe(engine, paths, prompt, run_to_end, Request, greedy))
    engine.close()
    return out


def cold_probe(engine, paths, prompt, run_to_end, Request, greedy, k: int = 5) -> dict:
    """Cold adapter load, measured through the idle engine: TTFT of a 1-token request for an adapter never used
    (a fresh name, so its file is read from disk — the OS page cache is warm) minus the TTFT of the same request
    right after (adapter now in RAM). Also a plain `safetensors` read of the file, the engine's own load function
(`lorakit.serve.adapters.load_adapter_weights`, disk -> RAM layout) and the base request's TTFT."""
    from safetensors.torch import load_file

    cold, warm, base, raw, direct = [], [], [], [], []
    for j in range(k):
        name = f"probe{j}"
        engine.register_adapter(name, str(paths[j % len(paths)]))
        cold.append(next(iter(run_to_end([Request(prompt, name, greedy(1))]).values())))
        warm.append(next(iter(run_to_end([Request(prompt, name, greedy(1))]).values())))
        base.append(next(iter(run_to_end([Request(prompt, None, greedy(1))]).values())))
        t = time.perf_counter()
        load_file(str(Path(paths[j % len(paths)]) / "adapter_model.safetensors"))
        raw.append(time.perf_counter() - t)
        try:  # the engine's own disk -> RAM load (internal API; skipped if it changes)
            from lorakit.serve.adapters import load_adapter_weights

            t = time.perf_counter()
            load_adapter_weights(engine.pool.specs()[name], engine.model.dims)
            direct.append(time.perf_counter() - t)
        except (ImportError, AttributeError, KeyError, TypeError):
            pass
    med = statistics.median
    extra = {"engine_load_ms": 1e3 * med(direct)} if direct else {}
    return {**extra, "cold_load_ms": 1e3 * med(c - w for c, w in zip(cold, warm)), "probe_ttft_cold_ms": 1e3 * med(cold),
            "probe_ttft_warm_ms": 1e3 * med(warm), "probe_ttft_base_ms": 1e3 * med(base),
            "safetensors_load_ms": 1e3 * med(raw), "probe_prompt_tokens": len(prompt)}


# ---- baselines: HF generate / PEFT with static batches ---------------------------------------------------------
def run_static(cell: dict, reqs: list[RequestSpec], paths: list[Path]) -> dict:
    """HF `generate` with static left-padded batches of up to `batch` requests, formed from arrived requests."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    system, batch_size = cell["system"], cell["batch"]
    out: dict = {}
    t = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(cell["model_dir"], dtype=torch.float32).eval()
    out["model_load_s"] = time.perf_counter() - t
    if system != "hf-base":
        from peft import PeftModel

        t = time.perf_counter()
        model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
        for i, p in enumerate(paths[1:], 1):
            model.load_adapter(str(p), adapter_name=f"a{i}")
        model.eval()
        out["register_s"] = time.perf_counter() - t
        out["register_ms_per_adapter"] = 1e3 * out["register_s"] / len(paths)

    class StepTimes(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    class Deadline(StoppingCriteria):  # a run over --max-run-s stops mid-batch; tokens made so far still count
        def __init__(self, clock: Clock):
            self.clock = clock

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.clock.over(), dtype=torch.bool)

    def generate(batch: list[RequestSpec], clock: Clock | None) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(batch):
            ids[j, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, width - len(r.prompt_ids):] = 1
        steps = max(r.output_len for r in batch)
        kw = {}
        if system == "peft-mixed":
            kw["adapter_names"] = [f"a{r.adapter}" for r in batch]
        elif system == "peft-seq":
            model.set_adapter(f"a{batch[0].adapter}")
        streamer = StepTimes()
        if clock is not None:
            kw["stopping_criteria"] = StoppingCriteriaList([Deadline(clock)])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0, streamer=streamer, **kw)
        tok_times = streamer.times[1:]  # the first put() is the prompt
        if clock is None:
            return
        if len(tok_times) != steps and not clock.stopped_early:
            raise RuntimeError(f"generate made {len(tok_times)} tokens, expected {steps}")
        for r in batch:
            if tok_times:
                clock.first[r.index] = tok_times[0] - clock.start
            if r.output_len <= len(tok_times):
                clock.finish[r.index] = tok_times[r.output_len - 1] - clock.start
            clock.tokens += min(r.output_len, len(tok_times))

    warm = [RequestSpec(-1, 0.0, 0 if paths else None, list(range(4, 52)), 4)] * min(2, batch_size)
    generate(warm, None)
    if system == "peft-mixed":
        generate(warm[:1] + [dataclasses.replace(warm[0], adapter=len(paths) - 1)], None)

    clock = Clock(reqs, cell["max_run_s"])
    todo, queue = list(reqs), []
    with RssSampler() as rss:
        while (todo or queue) and not clock.over():
            now = clock.now()
            while todo and todo[0].arrival <= now:
                queue.append(todo.pop(0))
            if not queue:
                clock.wait_until(todo[0].arrival)
                continue
            if system == "peft-seq":  # the adapter of the oldest waiting request, its requests in arrival order
                same = [r for r in queue if r.adapter == queue[0].adapter][:batch_size]
            else:
                same = queue[:batch_size]
            chosen = {r.index for r in same}
            queue = [r for r in queue if r.index not in chosen]
            generate(same, clock)
            clock.progress(cell["id"])
    out.update(summarize(clock))
    out["peak_rss_bytes"] = rss.peak
    return out


def run_cell(cell: dict) -> dict:
    """One (system, workload) measurement in this process."""
    import torch

    if cell.get("threads"):
        torch.set_num_threads(cell["threads"])
    w = Workload(**{k: tuple(v) if isinstance(v, list) else v for k, v in cell["workload"].items()})
    reqs = generate_requests(w)
    paths = [Path(p) for p in cell["adapters"]]
    from common import rss_bytes

    rss0 = rss_bytes()
    res = (run_engine if cell["system"] in ("ours", "base") else run_static)(cell, reqs, paths)
    res.update(id=cell["id"], system=cell["system"], workload=w.name, mode=w.mode, n=w.n_adapters,
               rss_start_bytes=rss0, torch_threads=torch.get_num_threads(), rate=w.rate if w.mode == "open" else None)
    return res


# ---- plan, run, report -----------------------------------------------------------------------------------------
def parse_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_cells(args, model_dir: Path, dims: Dims) -> list[dict]:
    """Every (workload, N, system) cell of the closed-loop table; open-loop cells are added later (their rate
    depends on the closed-loop result)."""
    cells = [make_cell(args, model_dir, dims, "base", (8,), 0, s, "closed") for s in ("base", "hf-base")
             if s in args.systems]  # base alone: the same requests without adapters
    for wname in args.workloads:
        ranks = (8,) if wname == "S1" else (8, 16, 32, 64)
        for n in args.n if wname == "S1" else args.n_s2:
            for system in ("ours", "peft-seq", "peft-mixed"):
                peft_n = args.peft_n if wname == "S1" else args.peft_n_s2
                if system in args.systems and (not system.startswith("peft") or n in peft_n):
                    cells.append(make_cell(args, model_dir, dims, wname, ranks, n, system, "closed"))
    return cells


def make_cell(args, model_dir, dims, wname, ranks, n, system, mode, rate: float = 1.0) -> dict:
    w = Workload(name=wname if n else "base", n_adapters=n, ranks=ranks, targets=QKVO, alpha=args.alpha, mode=mode,
                 num_requests=args.requests if mode == "closed" else max(4, round(rate * args.duration)),
                 rate=rate, cv=args.cv, input_range=args.input_range, output_range=args.output_range,
                 vocab_size=dims.vocab, seed=args.seed)
    paths = ensure_adapters(args.out / "adapters", w, dims, str(model_dir), log=log) if n and not args.dry_run else []
    cid = f"{mode}-{w.name}-n{n}-{system}" + (f"-rate{rate:.3g}" if mode == "open" else "")
    return {"id": cid, "system": system, "workload": dataclasses.asdict(w), "adapters": [str(p) for p in paths],
            "model_dir": str(model_dir), "batch": args.batch, "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras, "engine_opts": args.engine_opt, "threads": args.threads,
            "max_run_s": args.max_run_s}


def execute(cell: dict, args) -> dict | None:
    """Run a cell in a subprocess (or in this process with --in-process); None if it failed."""
    cache = args.out / "cells" / f"{cell['id']}.json"
    if args.resume and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("cell") == json.loads(json.dumps(cell)):
            log(f"  {cell['id']}: reused {cache}")
            return saved["result"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        if args.in_process:
            res = run_cell(cell)
        else:
            spec = cache.with_suffix(".cell.json")
            spec.write_text(json.dumps(cell))
            proc = subprocess.run([sys.executable, __file__, "--cell", str(spec)], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
            if proc.returncode:
                raise RuntimeError(f"exit code {proc.returncode}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as e:  # report and go on with the other cells
        log(f"  {cell['id']}: FAILED ({type(e).__name__}: {e})")
        return None
    cache.write_text(json.dumps({"cell": cell, "result": res}))
    log(f"  {cell['id']}: {res['tokens_per_s']:.1f} tok/s, {res['req_per_s']:.2f} req/s, "
        f"TTFT p50 {res['ttft_p50_s']:.2f} s ({time.perf_counter() - t:.0f} s wall)")
    return res


def fmt_s(x: float, lower_bound: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return ("≥" if lower_bound else "") + (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def mib(b: float) -> str:
    return f"{b / 2 ** 20:.0f}"


def table(results: list[dict], base_tps: float | None = None) -> str:
    """One row per run; *vs base* = tokens/s over the base-alone Engine's tokens/s (closed loop)."""
    from common import markdown_table

    header = ["N", "system", "tokens/s", "vs base", "req/s", "TTFT p50 s", "TTFT p90 s", "mean latency s", "TPOT ms",
              "peak RSS MiB", "done", "notes"]
    rows = []
    for r in results:
        notes = []
        if r.get("register_s") is not None and r["n"]:
            notes.append(f"register {r['n']}: {fmt_s(r['register_s'])} s")
        if r.get("cold_load_ms") is not None:
            notes.append(f"cold load {r['cold_load_ms']:.1f} ms")
        m = r.get("engine_metrics") or {}
        if m.get("adapter_evictions_total"):
            notes.append(f"evictions {m['adapter_evictions_total']:.0f}, misses {m.get('adapter_cache_misses_total', 0):.0f}")
        if m.get("preemptions_total"):
            notes.append(f"preemptions {m['preemptions_total']:.0f}")
        if r.get("stopped_early"):
            notes.append("stopped at --max-run-s")
        lb = r["ttft_lower_bound"]
        n = str(r["n"] or "–") + (f" @ {r['rate']:.2g} req/s" if r.get("mode") == "open" else "")
        vs = f"{r['tokens_per_s'] / base_tps:.2f}×" if base_tps and r["mode"] == "closed" else "–"
        rows.append([n, LABELS[r["system"]], f"{r['tokens_per_s']:.1f}", vs, f"{r['req_per_s']:.2f}",
                     fmt_s(r["ttft_p50_s"], lb), fmt_s(r["ttft_p90_s"], lb), fmt_s(r["latency_mean_s"]),
                     fmt_s(r["tpot_ms"]), mib(r["peak_rss_bytes"]), f"{r['finished']}/{r['requests']}",
                     "; ".join(notes)])
    return markdown_table(header, rows)


def ratios(results: list[dict]) -> list[str]:
    def find(system, wl, n, mode="closed"):
        return next((r for r in results if r["system"] == system and r["workload"] == wl and r["n"] == n
                     and r["mode"] == mode), None)

    lines = []
    base = find("base", "base", 0)
    big = max((r["n"] for r in results if r["system"] == "ours" and r["workload"] == "S1"), default=None)
    ours_big = find("ours", "S1", big) if big else None
    if base and ours_big:
        lines.append(f"- **ours / base alone, tokens/s, S1 N = {big}: {ours_big['tokens_per_s'] / base['tokens_per_s']:.2f}×**"
                     " (target ≥ 0.7×)")
    for wl in ("S1", "S2"):
        peft_ns = [r["n"] for r in results if r["system"].startswith("peft") and r["workload"] == wl]
        if not peft_ns:
            continue
        n = max(peft_ns)
        ours = find("ours", wl, n)
        best = max((r for r in results if r["system"].startswith("peft") and r["workload"] == wl and r["n"] == n
                    and r["mode"] == "closed"), key=lambda r: r["tokens_per_s"], default=None)
        if ours and best:
            lines.append(f"- **ours / best PEFT ({LABELS[best['system']]}), tokens/s, {wl} N = {n}: "
                         f"{ours['tokens_per_s'] / best['tokens_per_s']:.2f}×** (target ≥ 5×)")
    return lines


def adapter_lines(results: list[dict]) -> list[str]:
    """Registration and cold-load numbers of ours at the largest N of each workload."""
    out = []
    for wl in ("S1", "S2"):
        rs = [r for r in results if r["system"] == "ours" and r["workload"] == wl and r["mode"] == "closed"]
        if not rs:
            continue
        r = max(rs, key=lambda r: r["n"])
        parts = [f"- {wl} N = {r['n']} (ours): register {r['n']} adapters {r['register_s']:.2f} s "
                 f"({r['register_ms_per_adapter']:.2f} ms each)"]
        if "cold_load_ms" in r:
            parts.append(f"cold adapter load {r['cold_load_ms']:.1f} ms (TTFT {r['probe_ttft_cold_ms']:.0f} vs "
                         f"{r['probe_ttft_warm_ms']:.0f} ms warm, {r['probe_ttft_base_ms']:.0f} ms base, "
                         f"{r['probe_prompt_tokens']}-token prompt)")
            if "engine_load_ms" in r:
                parts.append(f"the engine's disk→RAM load function alone {r['engine_load_ms']:.1f} ms")
            parts.append(f"raw safetensors read {r['safetensors_load_ms']:.1f} ms")
        if "pool_loads" in r:
            parts.append(f"during the run {r['pool_loads']} cold loads took {r['pool_load_ms_p50']:.0f} ms p50, "
                         f"{r['pool_load_ms_p90']:.0f} ms p90 (load request → collected by the scheduler)")
        m = r.get("engine_metrics") or {}
        if m:
            parts.append(f"adapter cache hits/misses/evictions {m.get('adapter_cache_hits_total', 0):.0f}/"
                         f"{m.get('adapter_cache_misses_total', 0):.0f}/{m.get('adapter_evictions_total', 0):.0f}")
        out.append("; ".join(parts))
    return out


def theory_lines(args, dims: Dims) -> list[str]:
    out = []
    for wname in args.workloads:
        ns = [n for n in (args.n if wname == "S1" else args.n_s2) if n]
        if not ns:
            continue
        ranks = (8,) if wname == "S1" else (8, 16, 32, 64)
        w = Workload(name=wname, n_adapters=max(ns), ranks=ranks, alpha=args.alpha, num_requests=args.requests,
                     vocab_size=dims.vocab, seed=args.seed)
        r = mean_request_rank(w, generate_requests(w))
        f = flop_overhead(dims, r)
        out.append(f"- {wname}: mean rank per request {r:.1f} on q/k/v/o → theoretical LoRA FLOP overhead "
                   f"{f['adapted_layers']:.2%} of the adapted projections, {f['model']:.2%} of all Linear FLOPs "
                   f"(7 projections × {dims.layers} layers + LM head; attention scores excluded)")
    return out


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, wl in zip(axes, ("S1", "S2")):
        for system, style in (("ours", "o-"), ("peft-seq", "s--"), ("peft-mixed", "^--")):
            pts = sorted((r["n"], r["tokens_per_s"]) for r in results
                         if r["system"] == system and r["workload"] == wl and r["mode"] == "closed")
            if pts:
                ax.plot(*zip(*pts), style, label=LABELS[system])
        for system, ls in (("base", "-"), ("hf-base", ":")):
            b = next((r for r in results if r["system"] == system and r["mode"] == "closed"), None)
            if b:
                ax.axhline(b["tokens_per_s"], color="gray", ls=ls, label=LABELS[system])
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("adapters N")
        ax.set_title(f"{wl} (closed loop)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("generated tokens/s")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    if "--dtype-compare" in sys.argv[1:]:  # SmolLM2 bf16 vs fp32: its own flags and section
        from serve_dtype import main as dtype_compare

        return dtype_compare([a for a in sys.argv[1:] if a != "--dtype-compare"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model and workload, in-process, nothing written")
    ap.add_argument("--workloads", default="S1,S2")
    ap.add_argument("--n", default="1,8,32,128,1000", help="adapter counts of S1")
    ap.add_argument("--n-s2", default="8,32,128", help="adapter counts of S2")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--mode", choices=["both", "closed", "open"], default="both")
    ap.add_argument("--requests", type=int, default=64, help="requests per closed-loop run")
    ap.add_argument("--open-n", default="32,1000", help="S1 adapter counts of the open-loop runs")
    ap.add_argument("--open-systems", default="ours,peft-mixed", help="systems of the open-loop runs")
    ap.add_argument("--rate", default="auto", help="open-loop req/s; auto = 0.6 × ours' closed-loop req/s at that N")
    ap.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the open-loop gaps")
    ap.add_argument("--duration", type=float, default=60.0, help="open-loop arrival window (s)")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law popularity (1 = uniform)")
    ap.add_argument("--batch", type=int, default=32, help="max requests in flight (all systems)")
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--max-cpu-loras", type=int, default=64, help="RAM adapter cache size when N is larger")
    ap.add_argument("--peft-n", default="8,32", help="S1 adapter counts at which PEFT runs (at most 32: it holds "
                    "every adapter in the model)")
    ap.add_argument("--peft-n-s2", default="32", help="S2 adapter counts at which PEFT runs")
    ap.add_argument("--max-run-s", type=float, default=80.0,
                    help="stop a run after this long (slow baselines: tokens/s and req/s over the window)")
    ap.add_argument("--engine-opt", action="append", default=[], help="extra EngineConfig field, key=value (repeatable)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "serve_bench")
    ap.add_argument("--resume", action="store_true", help="reuse finished cells with identical settings")
    ap.add_argument("--in-process", action="store_true", help="run cells in this process (RSS not isolated)")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md / docs")
    ap.add_argument("--dry-run", action="store_true", help="list the closed-loop cells and the time bound, run nothing")
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(Path(args.cell).read_text()))), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common import header_lines, load_average, write_section

    args.workloads = [w for w in args.workloads.split(",") if w]
    args.systems = [s for s in args.systems.split(",") if s]
    args.open_systems = [s for s in args.open_systems.split(",") if s in args.systems]
    if bad := set(args.systems) - set(SYSTEMS) or set(args.workloads) - {"S1", "S2"}:
        ap.error(f"unknown system/workload {sorted(bad)}")
    args.n, args.n_s2, args.open_n = parse_list(args.n), parse_list(args.n_s2), parse_list(args.open_n)
    args.peft_n = [n for n in parse_list(args.peft_n) if n <= 32]
    args.peft_n_s2 = [n for n in parse_list(args.peft_n_s2) if n <= 32]
    args.engine_opt = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (o.split("=", 1) for o in args.engine_opt)}
    args.input_range, args.output_range = (8, 128), (8, 64)
    model_spec = FULL_MODEL
    if args.quick:
        args.n, args.n_s2, args.open_n, args.peft_n, args.peft_n_s2 = [1, 4, 12], [4], [4], [4], [4]
        args.requests, args.duration, args.batch, args.max_loras, args.max_cpu_loras = 12, 1.0, 4, 4, 4
        args.input_range, args.output_range, args.max_run_s = (4, 16), (2, 8), min(args.max_run_s, 30.0)
        args.rate = args.rate if args.rate != "auto" else "20"
        args.in_process, args.no_write = True, True
        args.out = args.out.parent / (args.out.name + "_quick")
        model_spec = QUICK_MODEL
    load0 = load_average()
    t_start = time.perf_counter()
    if args.dry_run:
        h = model_spec["hidden_size"]
        dims = Dims(h, model_spec.get("intermediate_size", 2816), model_spec["num_layers"], h // 64, h // 64,
                    model_spec["vocab_size"])
        cells = build_cells(args, args.out / "model", dims) if args.mode in ("both", "closed") else []
        n_open = sum(1 for n in args.open_n for s in args.open_systems if not s.startswith("peft") or n in args.peft_n)
        n_open *= args.mode in ("both", "open")
        print("\n".join(c["id"] for c in cells))
        print(f"{len(cells)} closed-loop + {n_open} open-loop cells; each stops after {args.max_run_s:.0f} s "
              f"(+ ~10 s start-up and probes): at most ~{(len(cells) + n_open) * (args.max_run_s + 10) / 60:.0f} min")
        return
    model_dir = ensure_model(args.out / "model", model_spec)
    dims = model_dims(model_dir)
    cells = build_cells(args, model_dir, dims) if args.mode in ("both", "closed") else []
    results = []
    log(f"{len(cells)} closed-loop cells, model {dims}, out {args.out}")
    for k, cell in enumerate(cells, 1):
        spent = time.perf_counter() - t_start
        eta = f", ~{spent / (k - 1) * (len(cells) - k + 1) / 60:.0f} min of closed-loop cells left" if k > 1 else ""
        log(f"[{k}/{len(cells)}] {cell['id']} ({spent:.0f} s so far{eta})")
        if (res := execute(cell, args)) is not None:
            results.append(res)
    if args.mode in ("both", "open"):
        for n in args.open_n:
            ours = next((r for r in results if r["system"] == "ours" and r["workload"] == "S1" and r["n"] == n), None)
            rate = float(args.rate) if args.rate != "auto" else (0.6 * ours["req_per_s"] if ours else 1.0)
            for system in ("ours", "peft-seq", "peft-mixed"):
                if system not in args.open_systems or (system.startswith("peft") and n not in args.peft_n):
                    continue
                cell = make_cell(args, model_dir, dims, "S1", (8,), n, system, "open", rate)
                log(f"[open] {cell['id']} ({time.perf_counter() - t_start:.0f} s so far)")
                if (res := execute(cell, args)) is not None:
                    results.append(res)
    total = time.perf_counter() - t_start
    closed = [r for r in results if r["mode"] == "closed"]
    opened = [r for r in results if r["mode"] == "open"]
    sections = []
    base_tps = next((r["tokens_per_s"] for r in closed if r["system"] == "base"), None)
    for wl in ("base", *args.workloads):
        rs = sorted((r for r in closed if r["workload"] == wl), key=lambda r: (r["n"], SYSTEMS.index(r["system"])))
        if rs:
            sections.append(f"### {wl}, closed loop ({args.requests} requests at t = 0)\n\n{table(rs, base_tps)}")
    if opened:
        rs = sorted(opened, key=lambda r: (r["n"], SYSTEMS.index(r["system"])))
        sections.append(f"### S1, open loop (Gamma arrivals, cv {args.cv}, {args.duration:.0f} s of arrivals at the rate "
                        f"shown; auto rate = 0.6 × ours' closed-loop req/s at that N)\n\n{table(rs)}")
    summary = ratios(results) + adapter_lines(results) + theory_lines(args, dims)
    if args.quick:
        summary.insert(0, "- --quick: a tiny model (hidden 64, 2 layers) and 12 requests: a smoke test, the timings and "
                          "ratios mean nothing")
    text = "\n\n".join(sections) + "\n\n" + "\n".join(summary)
    print(text, flush=True)
    out_json = args.out / "serve_results.json"
    out_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "dims": dataclasses.asdict(dims),
                                    "results": results, "total_s": total}, indent=1))
    log(f"wrote {out_json} ({total:.0f} s in total)")
    png = (args.out / "serve_throughput.png") if args.no_write else ROOT / "docs" / "serve_throughput.png"
    if plot(closed, png):
        log(f"wrote {png}")
    info = [f"- Model: random-weight Llama, hidden {dims.hidden}, {dims.layers} layers, {dims.heads} heads, "
            f"MLP {dims.intermediate}, vocab {dims.vocab}, fp32 (`lorakit.serve.model_dir.make_model`)",
            f"- Requests: input U{list(args.input_range)}, output U{list(args.output_range)} tokens, greedy, "
            f"fixed output length; popularity alpha {args.alpha}; at most {args.batch} requests in flight for every "
            f"system; ours: max_loras {args.max_loras}, RAM cache max_cpu_loras {args.max_cpu_loras} when N is larger",
            f"- One run per cell (no repetitions), each in its own process, stopped after {args.max_run_s:.0f} s; "
            f"total {total / 60:.0f} min"]
    body = f"""{header_lines(load0, info)}

Script: `.venv/bin/python bench/serve.py` (workload generator in `bench/serve_workloads.py`). *tokens/s* =
generated tokens / (last finish − first arrival); TTFT = first token − arrival; TPOT = (finish − first token) /
(output tokens − 1); *vs base* = tokens/s / base-alone (Engine) tokens/s; *peak RSS* = whole process (model
weights included), sampled every 50 ms while requests are served. Static baselines
(HF/PEFT `generate`) form a batch only from requests that have arrived, and are credited with each request's own
last-token time. *cold load* = TTFT of a 1-token request for a never-used adapter minus that of the same request
once the adapter is in RAM (idle engine; the file is in the OS page cache). *register N*: `register_adapter` for
all N (ours) or `load_adapter` for all N (PEFT). ≥ marks TTFT lower bounds of requests still unserved when a run
hit --max-run-s.

{chr(10).join(summary)}

{chr(10).join(s + chr(10) for s in sections)}
![tokens/s vs adapters](docs/serve_throughput.png)
"""
    if args.no_write:
        (args.out / "BENCHMARKS_serve.md").write_text(body)
        log(f"wrote {args.out / 'BENCHMARKS_serve.md'} (BENCHMARKS.md untouched)")
    else:
        write_section("serve", "Serving many adapters (`bench/serve.py`)", body)
        log("wrote the serve section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
