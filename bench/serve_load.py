"""Loopback load test of `lorakit serve`: 2x saturation for a bounded time, then a graceful shutdown.

Usage: `.venv/bin/python bench/serve_load.py [--duration 60] [--overload 2] [--max-requests 20000] [--smoke]`
(`--smoke` = a 10 s run). Steps:
1. Writes a small random Llama (hidden 128, 2 layers, vocab 1024) and `--adapters` random PEFT LoRA adapters
   (non-zero B) into a temp dir, and starts `python -m lorakit serve` on 127.0.0.1 in a subprocess (only
   loopback: nothing else is reachable or listened on).
2. Calibrates saturation: a closed loop with `max_num_seqs` concurrent clients for a few seconds -> req/s.
3. Open loop: Poisson arrivals at `--overload` x that rate for `--duration` s (at most `--max-requests`, and at
   most `--max-in-flight` client requests at once): a fixed pool of greedy requests (non-streaming and
   streaming, base model and adapters) plus seeded sampled ones.
4. SIGTERM while requests are still in flight; the server must exit by itself within its shutdown timeout.
Checks: no 5xx except 503 during shutdown; the server never dies before SIGTERM; RSS (psutil, sampled every
0.25 s) stays under the RSS after calibration + `--rss-growth-mb`; every 200 response is well-formed, and every
greedy 200 equals the same request run alone against an in-process Engine. Prints a summary table; exit code 1 if
a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def build_model(work: Path, n_adapters: int, seed: int) -> tuple[Path, dict[str, Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.serve.model_dir import make_model

    model_dir = make_model(work / "load-llama", hidden_size=128, num_layers=2, vocab_size=1024,
                           max_position_embeddings=512, seed=seed)
    adapters = {}
    for i in range(n_adapters):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        torch.manual_seed(seed + i + 1)
        r = (4, 8, 16)[i % 3]
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if i % 2 else ["q_proj", "v_proj", "down_proj"]
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                              init_lora_weights=False))
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        path = work / "adapters" / f"ad{i}"
        pm.save_pretrained(str(path))
        adapters[f"ad{i}"] = path
    return model_dir, adapters


class Stats:
    def __init__(self):
        self.status = collections.Counter()
        self.errors: list[str] = []
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.tokens = 0
        self.greedy_checked = 0
        self.mismatches = 0
        self.refused = 0  # connection errors (only expected during shutdown)

    def fail(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)


def make_pool(tokenizer, adapters: list[str], base: str, rng: random.Random, n: int) -> list[dict]:
    """Greedy request templates (each also sent streaming); the model field cycles over base + adapters."""
    words = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
             "by word but not what all were we when your can said there use an each which she do how their if "
             "will up other about out many then them these so some her would make like him into time has look").split()
    pool = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
        model = ([base] + adapters)[i % (len(adapters) + 1)]
        pool.append({"model": model, "prompt": prompt, "max_tokens": rng.randint(4, 32), "temperature": 0,
                     "ignore_eos": True})
    return pool


def references(model_dir: Path, adapters: dict[str, Path], pool: list[dict], tokenizer) -> list[str]:
    """Each greedy template run alone against an in-process Engine -> the text the server must return."""
    import torch

    from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

    torch.set_num_threads(1)
    engine = Engine.from_dir(model_dir, EngineConfig(memory_bytes=1 << 28))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    texts = []
    for t in pool:
        adapter = None if t["model"] not in adapters else t["model"]
        req = Request(prompt_ids=tokenizer(t["prompt"])["input_ids"], adapter=adapter,
                      params=SamplingParams(max_tokens=t["max_tokens"], temperature=0, ignore_eos=True))
        engine.generate([req])
        texts.append(tokenizer.decode(req.output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    engine.close()
    return texts


async def one_request(client, body: dict, expect: str | None, stats: Stats, shutting_down) -> None:
    import httpx

    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            text, first, usage = [], None, None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                if status == 200:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            stats.fail(f"stream error: {chunk['error']}")
                            continue
                        if first is None:
                            first = time.perf_counter() - t0
                        if chunk["choices"]:
                            text.append(chunk["choices"][0]["text"])
                            finish = chunk["choices"][0]["finish_reason"]
                            if finish == "abort":
                                status = "abort"
                        usage = chunk.get("usage") or usage
                else:
                    await r.aread()
            got = "".join(text)
        else:
            r = await client.post("/v1/completions", json=body)
            status = r.status_code
            if status == 200:
                data = r.json()
                got, usage = data["choices"][0]["text"], data["usage"]
                if data["choices"][0]["finish_reason"] not in ("stop", "length"):
                    stats.fail(f"finish_reason {data['choices'][0]['finish_reason']!r}")
    except (httpx.TransportError, httpx.StreamError, json.JSONDecodeError) as e:  # cut mid-line by a reset
        stats.refused += 1
        if not shutting_down():
            stats.fail(f"transport error before shutdown: {type(e).__name__}: {e}")
        return
    stats.status[status] += 1
    if status == 200:
        stats.latency.append(time.perf_counter() - t0)
        if body.get("stream") and first is not None:
            stats.ttft.append(first)
        if usage is not None:
            stats.tokens += usage["completion_tokens"]
            if usage["completion_tokens"] > body["max_tokens"]:
                stats.fail(f"{usage['completion_tokens']} tokens for max_tokens={body['max_tokens']}")
        if expect is not None:
            stats.greedy_checked += 1
            if got != expect:
                stats.mismatches += 1
                stats.fail(f"greedy mismatch for {body['model']!r}: {got[:60]!r} != {expect[:60]!r}")
    elif isinstance(status, int) and status >= 500 and not (status == 503 and shutting_down()):
        stats.fail(f"HTTP {status} for {json.dumps(body)[:120]}")


async def drive(args, port: int, pool: list[dict], expected: list[str], adapters: list[str], server, rss) -> dict:
    import httpx

    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=args.max_in_flight)
    stopping = {"on": False}
    shutting_down = lambda: stopping["on"]  # noqa: E731

    def request() -> tuple[dict, str | None]:
        if rng.random() < 0.8:
            i = rng.randrange(len(pool))
            return {**pool[i], "stream": rng.random() < 0.3}, expected[i]
        return {"model": rng.choice(adapters + [""]), "prompt": "sampled " * rng.randint(1, 20),
                "max_tokens": rng.randint(4, 32), "temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1 << 30),
                "stream": rng.random() < 0.3}, None

    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=120, limits=limits) as client:
        # 1. calibration: closed loop at the engine's concurrency
        calib = Stats()
        t_end = time.perf_counter() + args.calibrate

        async def worker():
            while time.perf_counter() < t_end:
                body, expect = request()
                await one_request(client, body, expect, calib, shutting_down)
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.max_num_seqs)])
        sat = calib.status[200] / (time.perf_counter() - t0)
        rss.mark()
        rate = max(sat * args.overload, 0.5)
        print(f"calibration: {calib.status[200]} requests in {args.calibrate:.0f} s -> saturation {sat:.1f} req/s; "
              f"open loop at {rate:.1f} req/s for {args.duration:.0f} s", flush=True)

        # 2. open loop at `overload` x saturation
        stats = Stats()
        tasks: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(args.max_in_flight)
        start = time.perf_counter()
        sent = 0
        while time.perf_counter() - start < args.duration and sent < args.max_requests:
            await asyncio.sleep(rng.expovariate(rate))
            if server.poll() is not None:
                stats.fail(f"the server died (exit code {server.returncode})")
                break
            if slots.locked():  # the client is bounded too: count as not sent
                stats.status["client_saturated"] += 1
                continue
            await slots.acquire()
            body, expect = request()
            task = asyncio.ensure_future(one_request(client, body, expect, stats, shutting_down))
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
            tasks.add(task)
            sent += 1
        elapsed = time.perf_counter() - start
        health = (await client.get("/health")).status_code if server.poll() is None else None
        metrics = (await client.get("/metrics")).text if server.poll() is None else ""

        # 3. graceful shutdown with requests in flight
        in_flight = len(tasks)
        stopping["on"] = True
        t_sig = time.perf_counter()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        late = [asyncio.ensure_future(one_request(client, request()[0], None, stats, shutting_down))
                for _ in range(4)]
        await asyncio.gather(*tasks, *late, return_exceptions=True)
        code = await asyncio.to_thread(server.wait, args.shutdown_timeout + 30)
        return dict(calib=calib, stats=stats, sat=sat, rate=rate, elapsed=elapsed, sent=sent, health=health,
                    metrics=metrics, in_flight=in_flight, exit_code=code, shutdown_s=time.perf_counter() - t_sig)


class RssSampler:
    def __init__(self, pid: int):
        import psutil
        import threading

        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self.baseline = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.25):
            try:
                rss = self.proc.memory_info().rss
                for child in self.proc.children(recursive=True):
                    rss += child.memory_info().rss
            except Exception:
                return
            self.samples.append((time.perf_counter(), rss))

    def mark(self):
        self.baseline = self.samples[-1][1] if self.samples else None

    def stop(self):
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of open-loop load")
    ap.add_argument("--calibrate", type=float, default=None, help="seconds of calibration (default: duration/6, 3-10)")
    ap.add_argument("--overload", type=float, default=2.0, help="arrival rate / saturation rate")
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--max-in-flight", type=int, default=128, help="client-side bound on concurrent requests")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--templates", type=int, default=48, help="distinct greedy requests (each checked)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-waiting", type=int, default=32)
    ap.add_argument("--shutdown-timeout", type=float, default=5.0)
    ap.add_argument("--rss-growth-mb", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a 10 s run")
    args = ap.parse_args()
    if args.smoke:
        args.duration = 10.0
    if args.calibrate is None:
        args.calibrate = min(10.0, max(3.0, args.duration / 6))

    from lorakit.serve.model_dir import load_tokenizer

    t = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lorakit-load-"))
    model_dir, adapters = build_model(work, args.adapters, args.seed)
    tokenizer = load_tokenizer(model_dir)
    pool = make_pool(tokenizer, list(adapters), model_dir.name, random.Random(args.seed), args.templates)
    expected = references(model_dir, adapters, pool, tokenizer)
    print(f"model + {len(adapters)} adapters + {len(pool)} references in {time.perf_counter() - t:.1f} s", flush=True)

    port = free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", str(model_dir), "--host", HOST, "--port", str(port),
           "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()], "--max-num-seqs", str(args.max_num_seqs),
           "--max-waiting", str(args.max_waiting), "--memory-gb", "0.25", "--max-loras", "4",
           "--shutdown-timeout", str(args.shutdown_timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    rss = RssSampler(server.pid)
    try:
        import httpx

        deadline = time.perf_counter() + 120
        while True:
            if server.poll() is not None:
                print(log_path.read_text()[-3000:])
                raise SystemExit(f"the server exited with {server.returncode} before becoming healthy")
            try:
                if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                raise SystemExit("the server did not become healthy in 120 s")
            time.sleep(0.2)
        result = asyncio.run(drive(args, port, pool, expected, list(adapters), server, rss))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        rss.stop()
    code = report(args, result, rss, log_path)
    if code == 0:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (server log: {log_path})")
    return code


def report(args, r: dict, rss: RssSampler, log_path: Path) -> int:
    s: Stats = r["stats"]
    calib: Stats = r["calib"]
    peak = max((v for _, v in rss.samples), default=0)
    base = rss.baseline or (rss.samples[0][1] if rss.samples else 0)
    fails = list(calib.errors) + list(s.errors)
    if r["health"] != 200:
        fails.append(f"/health before shutdown: {r['health']}")
    server_log = log_path.read_text(errors="replace")
    # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a normal exit when the lifespan ran
    if r["exit_code"] not in (0, -signal.SIGTERM) or "Application shutdown complete" not in server_log:
        fails.append(f"server exit code {r['exit_code']} after SIGTERM, no clean lifespan shutdown in {log_path}")
    if peak - base > args.rss_growth_mb * 2 ** 20:
        fails.append(f"RSS grew {(peak - base) / 2 ** 20:.0f} MiB (> {args.rss_growth_mb:.0f} MiB)")
    if s.greedy_checked + calib.greedy_checked == 0:
        fails.append("no greedy response was checked")
    if "Traceback" in server_log:
        fails.append(f"a traceback in the server log {log_path}")

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))

    rows = [("saturation (closed loop, max_num_seqs clients)", f"{r['sat']:.2f} req/s"),
            ("offered load (open loop)", f"{r['rate']:.2f} req/s x {r['elapsed']:.1f} s = {r['sent']} requests"),
            ("responses by status", ", ".join(f"{k}: {v}" for k, v in sorted(s.status.items(), key=str))),
            ("connection refused/reset (after SIGTERM)", str(s.refused)),
            ("served", f"{s.status[200] / r['elapsed']:.2f} req/s, {s.tokens / r['elapsed']:.1f} tokens/s"),
            ("latency p50 / p90 (200s)", f"{pct(s.latency, 50):.3f} / {pct(s.latency, 90):.3f} s"),
            ("TTFT p50 / p90 (streamed 200s)", f"{pct(s.ttft, 50):.3f} / {pct(s.ttft, 90):.3f} s"),
            ("greedy responses checked / mismatches",
             f"{s.greedy_checked + calib.greedy_checked} / {s.mismatches + calib.mismatches}"),
            ("server RSS after calibration / peak", f"{base / 2 ** 20:.0f} / {peak / 2 ** 20:.0f} MiB"),
            ("in flight at SIGTERM; exit code; shutdown time",
             f"{r['in_flight']}; {r['exit_code']}; {r['shutdown_s']:.2f} s")]
    width = max(len(k) for k, _ in rows)
    print("\n| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    if fails:
        print("\nFAILED:\n  " + "\n  ".join(fails[:20]))
        return 1
    print("\nOK: no 5xx (other than 503 during shutdown), no crash, RSS bounded, every greedy 200 correct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
