"""What a request asks for (SamplingParams), what the engine keeps of it (Request), what a step yields (RequestOutput)."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import RequestError

_ids = itertools.count()
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (vLLM's default max_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy when temperature == 0, else temperature + nucleus (top_p) with a per-request seed.

    `stop_token_ids` end the request (the stop token is kept in the output); the model's EOS does too unless
    `ignore_eos`. `record_logits` keeps the fp32 logits row of every generated position (tests, debugging).
    `logprobs`: a TokenLogprob for every generated token with that many top alternatives (0: the token's own
    only; None: none computed). `prompt_logprobs`: the same for the prompt's tokens (the first one gets None).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    record_logits: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
               "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(_number(self.temperature) and 0 <= self.temperature <= 100, "temperature",
               f"must be a number in [0, 100], got {self.temperature!r}")
        _check(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                     and 0 <= self.seed < 2 ** 63), "seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must be a list of non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOGPROBS), name,
                   f"must be null or an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise RequestError(f"{name} {message}", field=name)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw next-token distribution — log_softmax of the fp32 logits,
    before temperature and top-p (vLLM's default) — and the `top` most likely tokens as (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Request:
    """One generation request and everything the engine has produced for it.

    `adapter` is an adapter name or None for the base model. Times are `time.perf_counter()` seconds.
    `finish_reason`: None while running, then "stop" (EOS or a stop token), "length" (max_tokens or the
    context limit), "abort" (cancelled) or "error" (`error` says why, e.g. its adapter file is corrupt).
    `output_logprobs` / `prompt_logprobs` are filled when `params.logprobs` / `params.prompt_logprobs` ask for them.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request: its new token ids (with their `logprobs` when asked for),
    whether it is now finished, and, on the step that ran its prompt, the `prompt_logprobs` when asked for."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
