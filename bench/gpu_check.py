"""The GPU check (run by `bench/gpu_check.sh` on a machine with one CUDA GPU): prints a summary table.

1. the device-generic unit tests (`tests/test_device.py` with LORAKIT_TEST_DEVICE=cuda): adapters, DoRA and mixed
   batches against PEFT on the GPU, a bf16 instruct run, checkpoint RNG state;
2. a 50-step bf16 LoRA training run (instruct task, VADER movies) of a seeded random model with SmolLM2's config
   (the real weights are too large to carry), with its step time and peak GPU memory;
3. a short serving run: the engine on the same random model in bf16, greedy replies for a few requests with and
   without an adapter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict | None = None, timeout: int = 240) -> tuple[int, str, float]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc.returncode, (proc.stdout + proc.stderr), time.perf_counter() - started


def random_smollm2(bundle: Path, out: Path) -> Path:
    """A LlamaForCausalLM with SmolLM2's config and tokenizer and seeded random weights, saved to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(bundle / "smollm2-config")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(bundle / "smollm2-config").save_pretrained(out)
    return out


def unit_tests() -> tuple[str, str]:
    code, out, seconds = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"],
                             env={"LORAKIT_TEST_DEVICE": "cuda"})
    last = out.strip().splitlines()[-1] if out.strip() else "no output"
    return ("ok" if code == 0 else "FAILED"), f"{last} ({seconds:.0f} s)" + ("" if code == 0 else "\n" + out[-3000:])


def training(model_dir: Path, out: Path) -> tuple[str, str]:
    code, log, seconds = run([sys.executable, "-m", "lorakit", "train", "--model", str(model_dir), "--task", "instruct",
                              "--data", "vader:movies", "--bf16", "--device", "cuda", "--max-steps", "50",
                              "--max-eval-samples", "200", "--learning-rate", "1e-3", "--output-dir", str(out),
                              "--disable-tqdm"])
    if code:
        return "FAILED", log[-3000:]
    results = json.loads((out / "results.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    ok = len(losses) == 50 and all(v == v for v in losses) and results["dtype"] == "bfloat16" \
        and results["device"].startswith("cuda")
    return ("ok" if ok else "FAILED"), (
        f"{len(losses)} steps, loss {losses[0]:.3f} → {losses[-1]:.3f}, {results['seconds_per_step'] * 1e3:.0f} ms/step, "
        f"peak GPU memory {results['peak_memory_mb']:.0f} MiB, {seconds:.0f} s in all")


def serving(model_dir: Path, adapter_dir: Path) -> tuple[str, str]:
    """Greedy replies from the engine in bf16 on the GPU, for the base and the trained adapter."""
    try:
        from lorakit.serve.config import EngineConfig
        from lorakit.serve.engine import Engine
        from lorakit.serve.request import Request, SamplingParams
    except ImportError as e:
        return "skipped", f"serve engine not importable: {e}"
    fields = getattr(EngineConfig, "__dataclass_fields__", {})
    if "device" not in fields:
        return "skipped", "the serving engine has no device setting yet (CPU only)"
    started = time.perf_counter()
    engine = Engine.from_dir(model_dir, EngineConfig(device="cuda", dtype="bfloat16"))
    engine.register_adapter("movies", str(adapter_dir))
    prompts = [[1, 2, 3, 4, 5], [10, 20, 30], [7] * 12]
    requests = [Request(p, adapter=a, params=SamplingParams(max_tokens=8, temperature=0.0))
                for p in prompts for a in (None, "movies")]
    done = engine.generate(requests)
    tokens = sum(len(r.output_ids) for r in done)
    return "ok", f"{len(done)} requests, {tokens} tokens in {time.perf_counter() - started:.1f} s"


def main():
    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "gpu_bundle"
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch: the GPU check needs one")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "lorakit-gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    rows = [("device", "ok", f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                             f"Python {sys.version.split()[0]}")]
    rows.append(("unit tests (tests/test_device.py)", *unit_tests()))
    model_dir = random_smollm2(bundle, work / "random-smollm2")
    rows.append(("50-step bf16 LoRA run, SmolLM2 config", *training(model_dir, work / "run")))
    try:
        rows.append(("serving run", *serving(model_dir, work / "run" / "adapter")))
    except Exception as e:  # noqa: BLE001 - report, do not hide the table
        rows.append(("serving run", "FAILED", f"{type(e).__name__}: {e}"))
    print("\n| check | result | details |\n|---|---|---|")
    for name, status, details in rows:
        first, *rest = details.splitlines() or [""]
        print(f"| {name} | {status} | {first} |")
        if rest:
            print("\n".join(rest), file=sys.stderr)
    sys.exit(0 if all(status != "FAILED" for _, status, _ in rows) else 1)


if __name__ == "__main__":
    main()
