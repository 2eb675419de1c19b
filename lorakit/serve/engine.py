"""The serving engine: requests in, tokens out, one scheduler iteration per `step()`.

    engine = Engine.from_dir("my-llama", EngineConfig(max_loras=16))
    engine.register_adapter("sql", "adapters/sql")
    done = engine.generate([Request(prompt_ids=[1, 5, 9], adapter="sql", params=SamplingParams(max_tokens=32))])

A step runs the prefills of newly admitted requests and one decode token of every running request as one batch
over flattened tokens, rows grouped by adapter (see `lora.py`), with a paged KV cache. Log-probabilities
(`SamplingParams.logprobs`, `prompt_logprobs`) are the raw log_softmax of the fp32 logits (see TokenLogprob); a
prefill asking for prompt log-probs has the logits of all its rows computed. KV blocks and loaded
adapters share one memory budget (`EngineConfig.memory_bytes`). The engine is not thread-safe: one thread calls
everything (`AsyncEngine` in `async_engine.py` is that thread for the HTTP server).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path

import torch

from ..errors import CapacityError, ConfigError, QueueFullError, RequestError, UnknownAdapterError
from .adapters import AdapterPool
from .config import DTYPES, EngineConfig, serving_dtype
from .llama import LlamaRunner, SeqSlice, StepBatch
from .lora import LoraStep, Segment, StackCache
from .model_dir import resolve_model_dir
from .request import Request, RequestOutput, TokenLogprob
from .scheduler import Scheduler, Sequence, sample, token_logprobs

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: LlamaRunner, config: EngineConfig | None = None, eos_token_id=None):
        self.model, self.config = model, config or EngineConfig()
        cfg = self.config
        if cfg.dtype != "auto" and DTYPES[cfg.dtype] != model.dtype:
            raise ConfigError(f"EngineConfig.dtype is {cfg.dtype!r} but the model runner holds {model.dtype}; "
                              f"build it with that dtype (LlamaRunner.from_dir(..., dtype=...)) or use dtype='auto'")
        model.use_fp32_below(cfg.fp32_max_rows)
        self.block_bytes = model.kv_bytes_per_block(cfg.block_size)
        num_blocks = cfg.memory_bytes // self.block_bytes
        if num_blocks < 1:
            raise CapacityError(f"memory_bytes {cfg.memory_bytes} cannot hold one KV block ({self.block_bytes} bytes)")
        self.cache = model.new_cache(num_blocks, cfg.block_size)
        self.pool = AdapterPool(model.dims, cfg.max_lora_rank, cfg.max_cpu_loras, self.free_bytes, cfg.load_workers,
                                serving_dtype(cfg.lora_dtype, model.dtype))
        self.scheduler = Scheduler(self)
        self.stacks = StackCache()
        eos = eos_token_id if eos_token_id is not None else getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self.counters = dict(prompt_tokens_total=0, generation_tokens_total=0, requests_finished_total=0,
                             preemptions_total=0, step_errors_total=0, steps_total=0)

    @classmethod
    def from_dir(cls, model_dir, config: EngineConfig | None = None) -> "Engine":
        """An engine on a transformers model directory, or a model lorakit knows by name ("smollm2")."""
        config = config or EngineConfig()
        directory, name = resolve_model_dir(model_dir)
        return cls(LlamaRunner.from_dir(directory, config.dtype, name=name), config)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def max_model_len(self) -> int:
        return self.model.dims.max_len

    @property
    def eos_token_id(self) -> int | None:
        return min(self.eos_ids) if self.eos_ids else None

    # ---- adapters ------------------------------------------------------------------------------------------
    def register_adapter(self, name: str, path) -> None:
        self.pool.register(name, Path(path))

    def unregister_adapter(self, name: str) -> None:
        """Forget `name`: admitted requests finish with it, waiting ones fail (their adapter is gone)."""
        self.pool.unregister(name)

    def adapters(self) -> dict[str, str]:
        return {n: s.path for n, s in self.pool.specs().items()}

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        ids, vocab = request.prompt_ids, self.model.dims.vocab
        if not isinstance(ids, list) or not ids:
            raise RequestError("prompt must hold at least one token", field="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", field="prompt")
        total = len(ids) + request.params.max_tokens
        if total > self.max_model_len:
            raise CapacityError(f"prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) = {total} "
                                f"exceeds the model's context length {self.max_model_len}")
        if request.adapter is not None and request.adapter not in self.pool:
            raise UnknownAdapterError(f"adapter {request.adapter!r} is not registered "
                                      f"(known: {sorted(self.pool.specs())[:20]})")
        adapter_bytes = self.pool.specs()[request.adapter].nbytes if request.adapter is not None else 0
        if self.cache.pool.blocks_for(total) * self.block_bytes + adapter_bytes > self.config.memory_bytes:
            raise CapacityError(f"{total} tokens of KV cache" + (f" plus adapter {request.adapter!r} ({adapter_bytes} "
                                f"bytes)" if adapter_bytes else "") + f" exceed memory_bytes={self.config.memory_bytes}")
        if request.request_id in self._seqs:
            raise RequestError(f"request id {request.request_id!r} is already in use", field="request_id")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are waiting (max_waiting); retry later")
        seq = Sequence(request)
        self._seqs[request.request_id] = seq
        self.scheduler.waiting.append(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request now ("abort") and free its blocks; its output is also returned by the next step."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        out = self._finish(seq, "abort")
        self._pending.append(out)
        return out

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    def generate(self, requests: list[Request]) -> list[Request]:
        """Closed loop: add every request, step until all are finished."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            self.step()
        return requests

    # ---- memory --------------------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Room left in the shared budget for KV blocks and adapters."""
        used = self.cache.pool.used_blocks * self.block_bytes + self.pool.resident_bytes()
        return self.config.memory_bytes - used

    def reserve_blocks(self, seq: Sequence, tokens: int) -> bool:
        """Give `seq` blocks for `tokens` tokens, evicting idle adapters if needed; False if they cannot fit."""
        need = self.cache.pool.extra_blocks(seq.id, tokens)
        if need == 0:
            return True
        if need > self.cache.pool.free_blocks or not self.pool.make_room(need * self.block_bytes):
            return False
        self.cache.pool.grow(seq.id, tokens)
        return True

    def release(self, seq: Sequence) -> None:
        """Free a request's blocks and its hold on its adapter."""
        self.cache.pool.free(seq.id)
        if seq.adapter is not None:
            self.pool.unpin(seq.adapter)
            seq.adapter = None

    # ---- one iteration -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        self.counters["preemptions_total"] += len(plan.preempted)
        for seq, error in plan.failed:
            outputs.append(self._finish(seq, "error", error))
        if plan.empty:
            loading = self.pool.loading()
            if loading and not outputs:  # only cold adapters to wait for: sleep until one arrives
                concurrent.futures.wait(loading, timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)
            elif not loading and not plan.failed and self.scheduler.waiting:  # nothing runs and nothing can start
                seq = self.scheduler.waiting[0]
                outputs.append(self._finish(seq, "error", "the request cannot be scheduled: its KV blocks and adapter "
                                                          "do not fit in memory_bytes next to the loaded adapters"))
            return outputs
        seqs = self._layout(plan.prefills, plan.decodes)
        try:
            batch, last = self._batch(seqs)
            logits = self.model.step(batch, self.cache)
            rows = logits if batch.logits_rows is None else logits.index_select(0, torch.tensor(last))
            tokens = sample(rows, seqs)
            prompts = {} if batch.logits_rows is None else self._prompt_logprobs(seqs, logits, last)
        except Exception as e:  # never leave the engine wedged: fail this step's requests, keep serving
            log.exception("engine step failed")
            self.counters["step_errors_total"] += 1
            return outputs + [self._finish(s, "error", f"internal error in the model step: {e}") for s in seqs]
        now = time.perf_counter()
        self.counters["steps_total"] += 1
        for i, (seq, token, row) in enumerate(zip(seqs, tokens, rows)):
            if seq.computed == 0:
                self.counters["prompt_tokens_total"] += seq.length
            seq.computed = seq.length
            req = seq.request
            req.output_ids.append(token)
            extra = self._record_logprobs(req, token, row, prompts.get(i))
            if req.params.record_logits:
                req.logits.append(row.clone())
            if req.first_token_time is None:
                req.first_token_time = now
            self.counters["generation_tokens_total"] += 1
            reason = self._stop_reason(seq, token)
            out = self._finish(seq, reason) if reason else RequestOutput(req.request_id, (token,))
            outputs.append(dataclasses.replace(out, **extra) if extra else out)
        return outputs

    @staticmethod
    def _wants_prompt_logprobs(seq: Sequence) -> bool:
        req = seq.request
        return seq.computed == 0 and req.params.prompt_logprobs is not None and req.prompt_logprobs is None

    @staticmethod
    def _prompt_logprobs(seqs: list[Sequence], logits: torch.Tensor, last: list[int]) -> dict[int, list]:
        """{index in seqs: [None, TokenLogprob of prompt token 1, ...]} for the prefills asking for them; their
        logits rows are all there, ending at `last[i]` (row j predicts token j + 1)."""
        out = {}
        for i, seq in enumerate(seqs):
            if Engine._wants_prompt_logprobs(seq):
                prompt = seq.request.prompt_ids
                first = last[i] - (seq.length - 1)
                rows = logits[first:first + len(prompt) - 1]
                out[i] = [None] + token_logprobs(rows, prompt[1:], seq.request.params.prompt_logprobs)
        return out

    @staticmethod
    def _record_logprobs(req: Request, token: int, row: torch.Tensor,
                         prompt: list[TokenLogprob | None] | None) -> dict:
        """Keep the new token's log-prob (and the prompt's, on its prefill) on `req`; returns them as
        RequestOutput fields."""
        extra = {}
        if prompt is not None:
            req.prompt_logprobs = prompt
            extra["prompt_logprobs"] = tuple(prompt)
        if req.params.logprobs is not None:
            entry = token_logprobs(row[None], [token], req.params.logprobs)[0]
            req.output_logprobs.append(entry)
            extra["logprobs"] = (entry,)
        return extra

    def _layout(self, prefills: list[Sequence], decodes: list[Sequence]) -> list[Sequence]:
        """Rows grouped by adapter: prefills, then decodes, each sorted by adapter (base rows last)."""
        def key(s):
            return (s.adapter is None, s.adapter.spec.max_rank if s.adapter else 0, s.adapter.name if s.adapter else "")

        return sorted(prefills, key=key) + sorted(decodes, key=key)

    def _batch(self, seqs: list[Sequence]) -> tuple[StepBatch, list[int]]:
        """The step's batch, and for each sequence the index of its last row in the logits the step returns
        (all rows of prefills asking for prompt log-probs are returned, the last row of the others)."""
        tokens, positions, slices, segments, rows, last_rows = [], [], [], [], [], []
        pool = self.cache.pool
        for seq in seqs:
            ids = seq.request.all_ids
            start = len(tokens)
            new = ids[seq.computed:]
            tokens += new
            positions += range(seq.computed, len(ids))
            slices.append(SeqSlice(start, len(tokens), len(ids), pool.slots(seq.id, 0, len(ids))))
            rows += range(start, len(tokens)) if self._wants_prompt_logprobs(seq) else [len(tokens) - 1]
            last_rows.append(len(rows) - 1)
            if seq.adapter is not None:
                decode = seq.computed > 0
                last = segments[-1] if segments else None
                if last is not None and last.adapter is seq.adapter and last.decode == decode and last.stop == start:
                    last.stop = len(tokens)
                else:
                    segments.append(Segment(seq.adapter, start, len(tokens), decode))
        lora = LoraStep(segments, self.stacks, self.config.lora_kernel, self.config.bmm_min_adapters) if segments else None
        logits_rows = torch.tensor(rows, dtype=torch.long) if len(rows) > len(seqs) else None
        return StepBatch(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long), slices, lora,
                         logits_rows), last_rows

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.request.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.request.output_ids) >= p.max_tokens or seq.length >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        req = seq.request
        self.scheduler.remove(seq)
        self.release(seq)
        self._seqs.pop(req.request_id, None)
        req.finish_reason, req.error, req.finish_time = reason, error, time.perf_counter()
        self.counters["requests_finished_total"] += 1
        new = (req.output_ids[-1],) if reason in ("stop", "length") and req.output_ids else ()
        return RequestOutput(req.request_id, new, reason, error)

    # ---- monitoring ----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        pool = self.cache.pool
        return dict(self.counters, waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                    adapter_cache_hits_total=self.pool.hits, adapter_cache_misses_total=self.pool.misses,
                    adapter_evictions_total=self.pool.evictions, adapters_registered=len(self.pool.specs()),
                    adapters_loaded=self.pool.loaded_count(), adapter_bytes_loaded=self.pool.resident_bytes(),
                    kv_blocks_used=pool.used_blocks, kv_blocks_total=pool.num_blocks)

    def close(self) -> None:
        self.pool.shutdown()
