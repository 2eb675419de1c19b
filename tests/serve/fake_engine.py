"""A small stand-in for lorakit.serve.engine.Engine with the same sync API: deterministic tokens, no model.

Token rule: each running request gets one token per step, `next = (31 * last + 7 * len(all_ids) + salt) % span + 3`
(ids 0-2 are special: pad, bos, eos), `salt` depending on the adapter name. `step_delay` slows steps down;
`pool` restricts the tokens to a list of ids (readable text);
`fail_next_steps` makes the next steps raise (to test failure handling). Not thread-safe, like the real one.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import threading
import time
import zlib
from pathlib import Path

from lorakit.errors import (AdapterFileError, AdapterNameError, CapacityError, QueueFullError, RequestError,
                            UnknownAdapterError)
from lorakit.serve.request import Request, RequestOutput

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def expected_tokens(prompt_ids, adapter, max_tokens, vocab_size, stop_token_ids=(), pool=None):
    """The tokens FakeEngine produces for a request (run alone or not: each request's tokens are its own)."""
    ids, out = list(prompt_ids), []
    for _ in range(max_tokens):
        token = _next(ids, adapter, vocab_size, pool)
        ids.append(token)
        out.append(token)
        if token in stop_token_ids:
            break
    return out


def _next(ids, adapter, vocab_size, pool=None):
    salt = 0 if adapter is None else zlib.crc32(adapter.encode()) % 997
    if pool:
        return pool[(31 * ids[-1] + 7 * len(ids) + salt) % len(pool)]
    return (31 * ids[-1] + 7 * len(ids) + salt) % (vocab_size - 3) + 3


class FakeEngine:
    def __init__(self, vocab_size: int = 200, *, model_name: str = "fake-llama", max_model_len: int = 128,
                 max_num_seqs: int = 4, max_waiting: int = 64, block_size: int = 16, step_delay: float = 0.0,
                 eos_token_id: int | None = 2, pool: list[int] | None = None):
        self.vocab_size, self.model_name, self.max_model_len = vocab_size, model_name, max_model_len
        self.max_num_seqs, self.max_waiting, self.block_size = max_num_seqs, max_waiting, block_size
        self.step_delay, self.eos_token_id, self.pool = step_delay, eos_token_id, pool
        self.model_dir = f"/models/{model_name}"
        self._adapters: dict[str, str] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}
        self.aborted: list[str] = []
        self.fail_next_steps = 0
        self.threads: set[int] = set()  # ids of the threads that called the engine (must be one)
        self._m = collections.Counter()

    # adapters
    def register_adapter(self, name: str, path: str) -> None:
        if not isinstance(name, str) or not NAME.match(name) or name == self.model_name:
            raise AdapterNameError(f"invalid adapter name {name!r}")
        if name in self._adapters:
            raise AdapterNameError(f"adapter {name!r} is already registered")
        config = Path(path) / "adapter_config.json"
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise AdapterFileError(f"{path}: no readable adapter_config.json ({e})") from None
        self._adapters[name] = str(path)

    def unregister_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        del self._adapters[name]

    def adapters(self) -> dict[str, str]:
        return dict(self._adapters)

    # requests
    def add_request(self, req: Request) -> None:
        self.threads.add(threading.get_ident())
        if not req.prompt_ids:
            raise RequestError("prompt must not be empty", field="prompt")
        if any(not 0 <= t < self.vocab_size for t in req.prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})", field="prompt")
        if req.adapter is not None and req.adapter not in self._adapters:
            raise UnknownAdapterError(f"unknown adapter {req.adapter!r}")
        if len(req.prompt_ids) + req.params.max_tokens > self.max_model_len:
            raise CapacityError(f"prompt + max_tokens exceed {self.max_model_len}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests waiting")
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        self.threads.add(threading.get_ident())
        self.aborted.append(request_id)
        self.waiting = collections.deque(r for r in self.waiting if r.request_id != request_id)
        req = self.running.pop(request_id, None)
        if req is not None:
            req.finish_reason = "abort"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        self.threads.add(threading.get_ident())
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_next_steps:
            self.fail_next_steps -= 1
            raise RuntimeError("injected step failure")
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            self.running[req.request_id] = req
            self._m["prompt_tokens_total"] += len(req.prompt_ids)
        outputs = []
        for req in list(self.running.values()):
            token = _next(req.all_ids, req.adapter, self.vocab_size, self.pool)
            req.output_ids.append(token)
            self._m["generation_tokens_total"] += 1
            stops = set(req.params.stop_token_ids)
            if not req.params.ignore_eos and self.eos_token_id is not None:
                stops.add(self.eos_token_id)
            if token in stops:
                req.finish_reason = "stop"
            elif len(req.output_ids) >= req.params.max_tokens or len(req.all_ids) >= self.max_model_len:
                req.finish_reason = "length"
            if req.finished:
                del self.running[req.request_id]
                self._m["requests_finished_total"] += 1
            outputs.append(RequestOutput(req.request_id, (token,), req.finish_reason))
        return outputs

    def generate(self, requests: list[Request]) -> list[Request]:
        for r in requests:
            self.add_request(r)
        while self.has_work():
            self.step()
        return requests

    def metrics(self) -> dict[str, float]:
        used = sum(math.ceil(len(r.all_ids) / self.block_size) for r in self.running.values())
        return {"waiting": len(self.waiting), "running": len(self.running),
                "prompt_tokens_total": self._m["prompt_tokens_total"],
                "generation_tokens_total": self._m["generation_tokens_total"],
                "requests_finished_total": self._m["requests_finished_total"], "preemptions_total": 0,
                "adapter_cache_hits_total": 0, "adapter_cache_misses_total": 0, "adapter_evictions_total": 0,
                "adapters_loaded": len(self._adapters), "adapter_bytes_loaded": 0,
                "kv_blocks_used": used, "kv_blocks_total": 64}


# ---------------------------------------------------------------- shared test helpers (model dir built once)
_TINY: dict = {}


def tiny_model_dir() -> Path:
    """A random tiny Llama dir (hidden 64, 2 layers, vocab 512, context 256) with a chat-template tokenizer,
    built once per test process (tokenizer training takes a few seconds)."""
    if "dir" not in _TINY:
        import atexit
        import shutil
        import tempfile

        from lorakit.serve.model_dir import make_model

        root = tempfile.mkdtemp(prefix="lorakit-serve-test-")
        atexit.register(shutil.rmtree, root, True)
        _TINY["dir"] = make_model(Path(root) / "tiny-llama", hidden_size=64, num_layers=2, vocab_size=512,
                                  max_position_embeddings=256, seed=0)
    return _TINY["dir"]


def tiny_tokenizer():
    if "tok" not in _TINY:
        from lorakit.serve.model_dir import load_tokenizer

        _TINY["tok"] = load_tokenizer(tiny_model_dir())
    return _TINY["tok"]


def word_tokens(tokenizer) -> list[int]:
    """Ids that decode to ' <lowercase word>' (so fake outputs are readable text)."""
    return [i for i in range(len(tokenizer)) if re.fullmatch(r" [a-z]{2,}", tokenizer.decode([i]))]


def save_adapter(model_dir, out_dir, r: int = 4, seed: int = 0, targets=("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA adapter for the model in `model_dir` with random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                      init_lora_weights=False))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


@contextlib.asynccontextmanager
async def served(engine, tokenizer, **kw):
    """An httpx client on `build_app` over an AsyncEngine of `engine` (in-process ASGI, no socket); the client
    carries `.app` and `.ae`; the engine thread is shut down on exit."""
    import httpx

    from lorakit.serve.async_engine import AsyncEngine
    from lorakit.serve.server import build_app

    kw.setdefault("adapter_roots", [])
    ae = AsyncEngine(engine)
    app = build_app(ae, tokenizer, **kw)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        client.app, client.ae = app, ae
        try:
            yield client
        finally:
            await ae.shutdown(2)


def fake(tok, pool, **kw):
    """A FakeEngine over tokenizer `tok`'s vocabulary, drawing from the word tokens `pool`."""
    return FakeEngine(vocab_size=len(tok), pool=pool, **kw)
