"""Iteration-level scheduling: which requests run in the next step, and the sampling of their next tokens.

Each step first keeps every running request decoding (one token each), preempting the newest running requests
— freeing their KV blocks, to be recomputed later — when the KV memory cannot hold the next token. Then it admits
waiting requests first come, first served under a token budget, a cap on running requests and a cap of
`max_loras` distinct adapters per step: a request whose adapter is not yet in the step waits while the cap is
reached, and requests of adapters already in it keep being admitted (adapter affinity). A request whose adapter
is still loading from disk waits without blocking the others; FCFS stops at the first request whose KV blocks do
not fit.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import AdapterFileError, UnknownAdapterError
from .adapters import LoadedAdapter
from .request import Request, SamplingParams, TokenLogprob


@dataclass
class Sequence:
    """Engine-side state of one request."""

    request: Request
    adapter: LoadedAdapter | None = None  # pinned while admitted
    computed: int = 0                      # tokens whose K/V are in the cache
    generator: torch.Generator | None = None
    asked: bool = False                    # has asked the pool for its adapter (counts cache hits once)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.request.output_ids)


@dataclass
class Schedule:
    prefills: list[Sequence]
    decodes: list[Sequence]
    preempted: list[Sequence]
    failed: list[tuple[Sequence, str]]  # waiting requests that can never run (adapter unloaded or unreadable)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, engine):
        self.engine = engine
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def schedule(self) -> Schedule:
        e = self.engine
        cfg = e.config
        decodes, preempted = [], []
        for seq in list(self.running):
            if seq not in self.running:  # preempted to make room for an older request
                continue
            while not e.reserve_blocks(seq, seq.length):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                decodes.append(seq)
        prefills, failed = [], []
        budget = cfg.max_num_batched_tokens - len(decodes)
        adapters = {s.adapter.name for s in self.running if s.adapter is not None}
        for seq in list(self.waiting) if not preempted else []:
            if len(self.running) >= cfg.max_num_seqs:
                break
            name = seq.request.adapter
            if name is not None:
                if name not in adapters and len(adapters) >= cfg.max_loras:
                    continue
                try:
                    if name not in e.pool:
                        raise UnknownAdapterError(f"adapter {name!r} was unloaded")
                    loaded = e.pool.acquire(name)
                except (AdapterFileError, UnknownAdapterError) as err:  # fails this request only
                    failed.append((seq, str(err)))
                    self.waiting.remove(seq)
                    continue
                if not seq.asked:
                    seq.asked = True
                    e.pool.hits += loaded is not None
                if loaded is None:
                    continue  # loading from disk: the next requests go ahead
            if seq.length > budget and (prefills or decodes):
                break
            if name is not None:  # pinned first: making room for its KV blocks must not evict it
                seq.adapter = loaded
                e.pool.pin(name)
            if not e.reserve_blocks(seq, seq.length):
                e.release(seq)
                break
            self.waiting.remove(seq)
            if name is not None:
                adapters.add(name)
            self.running.append(seq)
            prefills.append(seq)
            budget -= seq.length
        return Schedule(prefills, decodes, preempted, failed)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running request's blocks and put it back at the head of the queue (recomputed later)."""
        self.running.remove(seq)
        self.engine.release(seq)
        seq.computed = 0
        seq.request.preemptions += 1
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax (as vLLM), dividing by them would overflow


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token of each sequence from its logits row: greedy, or temperature + top-p with its own generator."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, seq, best in zip(logits, seqs, greedy):
        p: SamplingParams = seq.request.params
        if p.temperature < GREEDY_BELOW:
            out.append(best)
            continue
        if seq.generator is None:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(p.seed if p.seed is not None else int(torch.randint(2 ** 62, ()).item()))
        probs = torch.softmax(row.double() / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = (sorted_probs.cumsum(0) - sorted_probs) < p.top_p  # the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).index_copy_(0, order[keep], sorted_probs[keep])
        out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return out


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """Row i: the log-probability of `token_ids[i]` under log_softmax(logits[i]) in fp32 — the model's raw
    distribution, before temperature and top-p (as vLLM's default) — with the row's top `k` (id, logprob)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, dtype=torch.long)[:, None])[:, 0].tolist()
    if k:
        values, ids = logp.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(token_ids)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops)]
