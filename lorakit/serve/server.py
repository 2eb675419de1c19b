"""OpenAI-compatible HTTP server (FastAPI) over an AsyncEngine; `serve()` runs it with uvicorn.

Endpoints: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has a chat template), GET /v1/models,
POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, GET /health, GET /metrics (Prometheus text), and
POST /v1/classify when a classifier is given. `model` in a request is an adapter name or the base model's name.
Two extra body fields choose the adapter instead: `merged_adapters` {ids, weights, merge_strategy "linear"} (LoRAX's
field) serves the exact weighted sum of registered adapters as one merged adapter named `merge:a=0.7,b=0.3`, built
once and cached (merged.py); `retrieve` {k, temperature} picks the k adapters whose descriptions are nearest to the
request's text (retrieval.py), one adapter for k = 1, else their softmax-weighted merge, and the response's extra
`lorakit.retrieved` field lists them with their scores and weights. Descriptions come from `build_app`/`serve`
(`adapter_descriptions`) or `description` in /v1/load_lora_adapter. `reclora` {bank, user} serves a RecLoRA bank
(`reclora_banks`, --reclora-bank) for one user vector: the user's own plain LoRA, built once and cached as merges are
(personal.py).
Completions take a list of prompts and `n` choices each, `echo` and `logprobs` (OpenAI's legacy format; echo +
logprobs + max_tokens 0 scores a prompt, as vLLM); chat takes `n`, `logprobs` + `top_logprobs`. Log-probs are the
model's raw log-softmax (before temperature / top-p, vLLM's default). Streaming serves one prompt, n=1, without
echo or logprobs (400 otherwise).

Errors are OpenAI-style JSON `{"error": {"message", "type", "param", "code"}}`: 400 for bad JSON / fields /
lengths (param names the field; an unknown field names the nearest valid one; an OpenAI/vLLM option this
server does not implement is refused as unsupported unless `lenient`, then ignored with a warning), 403 for
adapter paths outside the adapter roots, 404 for an unknown model or
adapter, 413 for a body over 4 MiB, 429 + Retry-After when the engine's queue is full, 503 while shutting down.
Bad input never yields a 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import difflib
import functools
import inspect
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from pathlib import Path

from starlette.requests import Request as HTTPRequest

from ..errors import (AdapterFileError, AdapterNameError, CapacityError, ConfigError, EngineStoppedError,
                      LorakitError, ModelError, QueueFullError, RequestError, UnknownAdapterError)
from ..io.files import read_adapter
from ..variants.reclora import personal_lora
from .merged import MAX_SOURCES, STRATEGIES, MergeCache, derived_name, parse_derived
from .personal import PERSONAL_NAME_RE, open_bank, personal_name
from .request import MAX_LOGPROBS, Request, SamplingParams
from .retrieval import Retriever, pick

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_BODY_BYTES = 4 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 1024
RETRY_AFTER_S = 1
UNSUPPORTED = {  # field -> the value that means "not used" (anything else is refused by name, never ignored)
    "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
EXTRAS = {  # OpenAI/vLLM options not implemented: field -> values that mean "not used" (others: 400, or lenient)
    "top_k": (None, -1, 0), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0), "use_beam_search": (None, False), "early_stopping": (None, False),
    "min_tokens": (None, 0), "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False), "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,),
    "allowed_token_ids": (None,), "bad_words": (None, []), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,), "structured_outputs": (None,), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "add_special_tokens": (None,), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "documents": (None,), "priority": (None, 0), "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False), "parallel_tool_calls": (None, True), "function_call": (None, "none"),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,),
}
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "stream", "stream_options", "user", "store", "metadata", "service_tier", "request_id",
                   "n", "logprobs", "top_logprobs", "echo", "merged_adapters", "retrieve", "reclora"} | \
    set(UNSUPPORTED) | set(EXTRAS)
FIELDS = {  # endpoint -> the body fields it knows
    "/v1/completions": SAMPLING_FIELDS | {"prompt"},
    "/v1/chat/completions": SAMPLING_FIELDS | {"messages", "max_completion_tokens"},
    "/v1/load_lora_adapter": {"lora_name", "lora_path", "load_inplace", "description"},
    "/v1/unload_lora_adapter": {"lora_name", "lora_int_id"},
    "/v1/classify": {"model", "input", "user"},
}
MERGE_FIELDS = ("ids", "weights", "merge_strategy", "density", "majority_sign_method")  # LoRAX's MergedAdapters
RETRIEVE_FIELDS = ("k", "temperature")
RECLORA_FIELDS = ("bank", "user")
RETRIEVE_TEMPERATURE = 0.05  # softmax temperature over cosine similarities when `retrieve` gives none
MAX_DESCRIPTION_CHARS = 4096
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
access_log = logging.getLogger("lorakit.serve.access")
SHUTDOWN_EVENT = {"error": {"message": "the request was aborted: the server is shutting down",
                            "type": "service_unavailable", "param": None, "code": "shutting_down"}}


class HTTPError(Exception):
    """An error response: status, OpenAI error type, message, param (the field), optional headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def _error_response(e: HTTPError):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def to_http_error(e: Exception) -> HTTPError:
    """The HTTP error for a lorakit exception (anything unexpected is a 500 that hides internals)."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, UnknownAdapterError):
        return HTTPError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, QueueFullError):
        return HTTPError(429, f"the server is busy: {e}", type="rate_limit_error", code="rate_limit_exceeded",
                         headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineStoppedError):
        return HTTPError(503, str(e) or "the server is shutting down", type="service_unavailable",
                         code="shutting_down")
    if isinstance(e, RequestError):
        return HTTPError(400, str(e), param=e.field)
    if isinstance(e, (CapacityError, AdapterNameError, AdapterFileError, ConfigError)):
        return HTTPError(400, str(e))
    if isinstance(e, LorakitError):
        return HTTPError(400, str(e))
    log.error("internal error: %r", e, exc_info=e)
    return HTTPError(500, "internal server error", type="server_error")


# ------------------------------------------------------------------ field validation
def _bad(field: str, message: str):
    raise HTTPError(400, f"{field}: {message}", param=field)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt(body: dict, field: str, kind: str, default=None, *, low=None, high=None):
    """body[field] checked as `kind` (int | number | bool | str); missing or null gives `default`."""
    v = body.get(field)
    if v is None:
        return default
    ok = {"int": _is_int, "number": _is_number, "bool": lambda x: isinstance(x, bool),
          "str": lambda x: isinstance(x, str)}[kind](v)
    if not ok:
        _bad(field, f"must be {'an' if kind == 'int' else 'a'} {kind}, got {type(v).__name__}")
    if low is not None and v < low or high is not None and v > high:
        _bad(field, f"must be >= {low}, got {v!r}" if high is None else f"must be in [{low}, {high}], got {v!r}")
    return v


def _token_ids(field: str, v) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        _bad(field, "must be a list of integers")
    if any(t < 0 or t >= 2 ** 31 for t in v):
        _bad(field, "token ids must be in [0, 2^31)")
    return v


def _stop_strings(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        _bad("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        _bad("stop", f"stop strings must have 1 to {MAX_STOP_LENGTH} characters")
    return stops


def _is_neutral(value, options) -> bool:
    """Whether `value` is one of `options` (same type: True is not 1)."""
    return any(value is x or value == x and type(value) is type(x) for x in options)


def check_fields(body: dict, known: set[str], lenient: bool = False) -> None:
    """400 for a field `known` lacks (naming the nearest known one) and for an EXTRAS option set to a value we
    would have to act on; with `lenient` those options are dropped from `body` with a warning instead."""
    for field in list(body):
        if field not in known:
            near = difflib.get_close_matches(field, sorted(known - set(EXTRAS)), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            _bad(field, f"unrecognized request field{hint}")
        if field in EXTRAS and not _is_neutral(body[field], EXTRAS[field]):
            if not lenient:
                _bad(field, "is unsupported by this server (run it with --lenient to ignore such options)")
            log.warning("ignoring the unsupported option %s=%.100r (--lenient)", field, body[field])
            del body[field]


def surrogate_field(body) -> str | None:
    """The path ("messages[0].content") of the first string (key or value) in a JSON value holding a lone UTF-16
    surrogate (not encodable as UTF-8: tokenizers and responses would fail on it), or None."""
    stack = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not _utf8(value):
                return where or "body"
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                path = f"{where}.{key}" if where else key
                if not _utf8(key):
                    return where or "body"
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unsupported(body: dict) -> None:
    for field, neutral in UNSUPPORTED.items():
        if field in body:
            value = body[field]
            if not any(value == x and type(value) is type(x) or value is x for x in neutral):
                _bad(field, "is not supported by this server")


def _sampling(body: dict, max_tokens_field: str = "max_tokens") -> tuple[SamplingParams, list[str], bool]:
    max_tokens = _opt(body, max_tokens_field, "int", 16, low=1)
    temperature = _opt(body, "temperature", "number", 1.0, low=0, high=2)
    top_p = _opt(body, "top_p", "number", 1.0, low=0, high=1)
    if top_p == 0:
        _bad("top_p", "must be in (0, 1]")
    seed = _opt(body, "seed", "int", None, low=0, high=2 ** 63 - 1)
    stop_ids = body.get("stop_token_ids")
    stop_ids = () if stop_ids is None else tuple(_token_ids("stop_token_ids", stop_ids))
    if len(stop_ids) > 1024:
        _bad("stop_token_ids", "at most 1024 ids")
    ignore_eos = _opt(body, "ignore_eos", "bool", False)
    stream = _opt(body, "stream", "bool", False)
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                            stop_token_ids=stop_ids, ignore_eos=ignore_eos)
    return params, _stop_strings(body), stream


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        _bad("stream_options", "must be an object")
    return bool(_opt(options, "include_usage", "bool", False))


# ------------------------------------------------------------------ merged_adapters, retrieve
def _sub_opt(spec: dict, parent: str, key: str, kind: str, default=None, **bounds):
    """`_opt` for a key of a nested object: the error names `parent.key`."""
    field = f"{parent}.{key}"
    return _opt({field: spec.get(key)}, field, kind, default, **bounds)


def _check_keys(spec, parent: str, known: tuple, what: str) -> dict:
    if not isinstance(spec, dict):
        _bad(parent, f"must be an object {what}")
    for key in spec:
        if key not in known:
            _bad(f"{parent}.{key}", f"unrecognized field; known: {', '.join(known)}")
    return spec


def merged_spec(body: dict) -> tuple[tuple[str, float], ...] | None:
    """`merged_adapters` as (id, weight) pairs in the request's order (None when absent); 400 naming the field for
    a malformed one. Ids are not looked up here."""
    parent = "merged_adapters"
    spec = body.get(parent)
    if spec is None:
        return None
    _check_keys(spec, parent, MERGE_FIELDS, "{ids, weights, merge_strategy}")
    strategy = spec.get("merge_strategy")
    if strategy is not None and strategy not in STRATEGIES:
        _bad(f"{parent}.merge_strategy", f"{str(strategy)[:50]!r} is not supported; supported: "
                                         f"{', '.join(STRATEGIES)} (the exact weighted sum of the adapters)")
    if not _is_neutral(spec.get("density"), (None, 1, 1.0)):
        _bad(f"{parent}.density", "is for the ties / dare strategies, which this server does not support")
    if not _is_neutral(spec.get("majority_sign_method"), (None, "total")):
        _bad(f"{parent}.majority_sign_method", "is for the ties / dare strategies, which this server does not "
                                               "support")
    ids, weights = spec.get("ids"), spec.get("weights")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        _bad(f"{parent}.ids", "must be a non-empty list of adapter names")
    if len(ids) > MAX_SOURCES:
        _bad(f"{parent}.ids", f"at most {MAX_SOURCES} adapters, got {len(ids)}")
    twice = next((i for n, i in enumerate(ids) if i in ids[:n]), None)
    if twice is not None:
        _bad(f"{parent}.ids", f"{twice[:200]!r} is listed twice; give each adapter once, with its total weight")
    if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                for w in weights):
        _bad(f"{parent}.weights", "must be a list of numbers, one per id")
    if len(weights) != len(ids):
        _bad(f"{parent}.weights", f"{len(ids)} ids need {len(ids)} weights, got {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        _bad(f"{parent}.weights", f"must be finite numbers, got {weights}")
    return tuple(zip(ids, (float(w) for w in weights)))


def retrieve_spec(body: dict) -> tuple[int, float] | None:
    """`retrieve` as (k, temperature) (None when absent); 400 naming the field for a malformed one."""
    spec = body.get("retrieve")
    if spec is None:
        return None
    if body.get("merged_adapters") is not None:
        _bad("retrieve", "give merged_adapters or retrieve, not both")
    _check_keys(spec, "retrieve", RETRIEVE_FIELDS, "{k, temperature}")
    k = _sub_opt(spec, "retrieve", "k", "int", 1, low=1)
    temperature = _sub_opt(spec, "retrieve", "temperature", "number", RETRIEVE_TEMPERATURE, low=0)
    if temperature == 0:
        _bad("retrieve.temperature", "must be > 0")
    return k, float(temperature)


def reclora_spec(body: dict) -> tuple[str, list[float]] | None:
    """`reclora` as (bank, user vector) (None when absent); 400 naming the field for a malformed one. The bank is
    not looked up here."""
    spec = body.get("reclora")
    if spec is None:
        return None
    other = next((f for f in ("merged_adapters", "retrieve") if body.get(f) is not None), None)
    if other:
        _bad("reclora", f"give {other} or reclora, not both")
    _check_keys(spec, "reclora", RECLORA_FIELDS, "{bank, user}")
    bank, user = spec.get("bank"), spec.get("user")
    if not isinstance(bank, str) or not bank:
        _bad("reclora.bank", "must be the name of a RecLoRA bank (a string)")
    if not isinstance(user, list) or not user or not all(_is_number(x) for x in user):
        _bad("reclora.user", "must be a non-empty list of numbers (the user's vector)")
    if not all(math.isfinite(x) for x in user):
        _bad("reclora.user", "must be finite numbers")
    return bank, [float(x) for x in user]


@dataclasses.dataclass
class AdapterChoice:
    """The adapter a request runs with (None: the base model), the lease on it when it is a merged one (held until
    the response ends), and the response's extra `lorakit` field (retrieval results)."""

    adapter: str | None
    lease: object | None = None
    extra: dict | None = None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


# ------------------------------------------------------------------ n, echo, logprobs
MAX_CHOICES = 256  # prompts x n in one request


def _n(body: dict, prompts: int) -> int:
    """`n`: choices per prompt (each choice j of a seeded request samples with seed + j)."""
    n = _opt(body, "n", "int", 1, low=1, high=MAX_CHOICES)
    if n * prompts > MAX_CHOICES:
        _bad("n", f"prompts x n must be at most {MAX_CHOICES}, got {prompts} x {n}")
    return n


def _completion_logprobs(body: dict) -> int | None:
    """/v1/completions `logprobs`: the number of top alternatives per token (null/false: none)."""
    if body.get("logprobs") is False:
        return None
    if body.get("top_logprobs") not in (None, 0):
        _bad("top_logprobs", "is a chat field; on /v1/completions use logprobs (an integer)")
    return _opt(body, "logprobs", "int", None, low=0, high=MAX_LOGPROBS)


def _chat_logprobs(body: dict) -> int | None:
    """/v1/chat/completions `logprobs: true` + `top_logprobs: k` -> k (None: no log-probs)."""
    if body.get("echo") not in (None, False):
        _bad("echo", "is only for /v1/completions")
    wanted = _opt(body, "logprobs", "bool", False)
    k = _opt(body, "top_logprobs", "int", None, low=0, high=MAX_LOGPROBS)
    if k and not wanted:
        _bad("top_logprobs", "needs logprobs: true")
    return (k or 0) if wanted else None


def _refuse_multi_stream(streaming: bool, choices: int, echo: bool, top_k: int | None) -> None:
    """Streaming serves one choice of generated text: refuse n > 1, several prompts, echo and logprobs."""
    if streaming and (choices > 1 or echo or top_k is not None):
        _bad("stream", "streaming supports one prompt, n=1, no echo and no logprobs; send stream: false")


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j's sampling: seed + j, so the n choices of a seeded request differ and are reproducible."""
    if j == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + j) % 2 ** 63)


@dataclasses.dataclass
class Generated:
    """One choice's result: its token ids (the stop token included, as in usage) with their log-probs, the
    prompt's log-probs (when asked for), the text (stop token / string left out) and the finish reason."""

    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    prompt_logprobs: tuple | None = None
    text: str = ""
    finish_reason: str | None = None

    def add(self, out) -> None:
        self.token_ids += out.new_token_ids
        self.logprobs += getattr(out, "logprobs", ())
        if getattr(out, "prompt_logprobs", None) is not None:
            self.prompt_logprobs = out.prompt_logprobs


def _token_text(tokenizer, token_id: int) -> str:
    """A token as text (special tokens spelled out; `token_id:N` without a tokenizer, as vLLM's option)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _legacy_logprobs(tokenizer, token_ids: list[int], entries: list) -> dict:
    """OpenAI's completions format {tokens, token_logprobs, top_logprobs, text_offset}; an entry None (an echoed
    prompt's first token) gives None. `top_logprobs` maps token text -> logprob for the top k plus the token
    itself (as vLLM; tokens of the same text share a key); `text_offset` counts characters of the token texts from the choice's text start."""
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else {_token_text(tokenizer, t): lp  # the token last: its text wins
                                                 for t, lp in (*entry.top, (token_id, entry.logprob))})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprob_content(tokenizer, token_ids: list[int], entries: list) -> dict:
    """OpenAI's chat format {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def item(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for t, e in zip(token_ids, entries)]}


# ------------------------------------------------------------------ text out
class Detokenizer:
    """Incremental decoding: text deltas that are stable (no half UTF-8 character at the end).

    Decodes a sliding window (a few previous tokens as context, as vLLM does) so the cost per token stays small
    and tokenizers that strip a leading space at the start of a decode still give the right spacing.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], context: int = 4):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids, final: bool = False) -> str:
        self.ids.extend(new_ids)
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class StopMatcher:
    """Cuts a stream of text deltas at the first stop string (excluded), holding back a possible stop prefix."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        if final:
            self.pending = ""
            return text, False
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False


# ------------------------------------------------------------------ app
class Histogram:
    """A Prometheus histogram (cumulative `le` buckets, sum, count)."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, help: str) -> list[str]:
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}",
                      f"{name}_count {self.count}"]


@dataclasses.dataclass
class HTTPStats:
    """What the server counts per response: status codes (/v1/), latency histograms, requests per model."""

    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    ttft: Histogram = dataclasses.field(default_factory=Histogram)
    latency: Histogram = dataclasses.field(default_factory=Histogram)
    per_model: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Exchange:
    """One HTTP request as the access log and metrics see it; `streams` are its engine requests."""

    started: float
    streams: list = dataclasses.field(default_factory=list)
    status: int | None = None


_exchange: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar("lorakit_exchange", default=None)


def track_stream(stream) -> None:
    """Attach an engine request's stream to the HTTP request being served (for its log line and metrics)."""
    exchange = _exchange.get()
    if exchange is not None:
        exchange.streams.append(stream)


class _Observer:
    """Pure ASGI middleware (streaming and disconnects untouched) around every request: turns an exception that
    escapes the app into a JSON 500 (or a cleanly ended body once the response started) so the connection stays
    usable; counts /v1/ responses by status, latencies and requests per model; writes one access-log line."""

    def __init__(self, app, stats: HTTPStats, base_name: str):
        self.app, self.stats, self.base_name = app, stats, base_name

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = _Exchange(time.monotonic())
        token = _exchange.set(exchange)

        async def observed_send(message):
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, observed_send)
        except Exception as e:  # noqa: BLE001 — answered here, never a dropped connection
            await self._fail(e, scope, exchange, send)
        finally:
            _exchange.reset(token)
            self._record(scope, exchange)

    @staticmethod
    async def _fail(e: Exception, scope, exchange: _Exchange, send) -> None:
        if exchange.status is None:
            response = _error_response(to_http_error(e))
            exchange.status = response.status_code
            await response(scope, None, send)
        else:
            log.error("error after the response started: %r", e, exc_info=e)
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _record(self, scope, exchange: _Exchange) -> None:
        elapsed = time.monotonic() - exchange.started
        path = scope.get("path", "")
        if path.startswith("/v1/") and exchange.status is not None:
            key = str(exchange.status)
            self.stats.statuses[key] = self.stats.statuses.get(key, 0) + 1
        models = [s.adapter or self.base_name for s in exchange.streams]
        for stream, model in zip(exchange.streams, models):
            self.stats.per_model[model] = self.stats.per_model.get(model, 0) + 1
            if stream.ttft is not None:
                self.stats.ttft.observe(stream.ttft)
        if exchange.streams:
            self.stats.latency.observe(elapsed)
        client = scope.get("client") or ("-", 0)
        extra = ""
        if exchange.streams:
            ttfts = [s.ttft for s in exchange.streams if s.ttft is not None]
            extra = (f" model={','.join(sorted(set(models)))} prompt_tokens="
                     f"{sum(s.prompt_tokens for s in exchange.streams)} completion_tokens="
                     f"{sum(s.generated for s in exchange.streams)}"
                     + (f" ttft={min(ttfts):.3f}s" if ttfts else ""))
        access_log.info('%s:%s "%s %s" %s%s latency=%.3fs', client[0], client[1], scope.get("method", "-"), path,
                        exchange.status if exchange.status is not None else "-", extra, elapsed)


def build_app(async_engine, tokenizer, *, adapter_roots: list[str] | None = None, served_name: str | None = None,
              classifier=None, shutdown_timeout: float = 30.0, lenient: bool = False,
              adapter_descriptions: dict[str, str] | None = None, max_merged_adapters: int = 8, retriever=None,
              reclora_banks: dict[str, str] | None = None):
    """The FastAPI app. `adapter_roots`: directories `/v1/load_lora_adapter` may load from (none: loading is
    refused). `served_name`: the base model's name (default: the engine's). `lenient`: ignore (with a warning)
    OpenAI/vLLM options this server does not implement instead of refusing them. `adapter_descriptions`: adapter
    name -> text, for `retrieve` requests. `max_merged_adapters`: merged adapters kept (LRU; `app.state.merges`).
    `retriever`: a `Retriever` (default: one on the descriptions, loading MiniLM at the first retrieval;
    `app.state.retriever`). `reclora_banks`: bank name -> folder of a saved RecLoRA adapter, for `reclora` requests
    (each user's adapter shares the merged adapters' cache; `app.state.banks`).

    `app.state.drain()` starts the engine's shutdown once (requests get `shutdown_timeout` s to finish, then 503 /
    an error event) and returns its task; the lifespan's end awaits it. `serve()` calls it when SIGTERM arrives,
    before the HTTP server's own grace period would cancel handlers."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    base_name = served_name or async_engine.model_name
    roots = [os.path.realpath(r) for r in (adapter_roots or [])]
    created = int(time.time())
    stats = HTTPStats()
    stop_ids_base = {async_engine.eos_token_id} if async_engine.eos_token_id is not None else set()
    config = getattr(getattr(async_engine, "engine", None), "config", None)
    merges = MergeCache(async_engine, max_merged_adapters, getattr(config, "max_lora_rank", None))
    retriever = retriever if retriever is not None else Retriever()
    for name, text in (adapter_descriptions or {}).items():
        if name not in async_engine.adapters():
            raise ConfigError(f"a description is given for adapter {name!r}, which is not registered")
        retriever.describe(name, text)
    banks = {}
    for name, folder in (reclora_banks or {}).items():
        if not ADAPTER_NAME.match(name) or name in async_engine.adapters() or name in (base_name,
                                                                                        async_engine.model_name):
            raise ConfigError(f"--reclora-bank {name!r}: a bank name must match {ADAPTER_NAME.pattern} and differ "
                              f"from the base model's and every adapter's name")
        banks[name] = open_bank(name, folder)
        limit = getattr(config, "max_lora_rank", None)
        if limit is not None and banks[name].rank > limit:
            raise ConfigError(f"--reclora-bank {name}: its users' adapters have rank {banks[name].rank}, more than "
                              f"this server's max LoRA rank {limit} (--max-lora-rank)")

    draining: list[asyncio.Task] = []

    def drain() -> asyncio.Task:
        if not draining:
            draining.append(asyncio.ensure_future(async_engine.shutdown(shutdown_timeout)))
        return draining[0]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await drain()
        merges.close()
        close = getattr(classifier, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.drain = drain
    app.state.merges, app.state.retriever, app.state.banks = merges, retriever, banks
    app.add_middleware(_Observer, stats=stats, base_name=base_name)

    @app.exception_handler(Exception)
    async def on_unexpected(request, e: Exception):  # a JSON 500, never a traceback page
        return _error_response(to_http_error(e))

    @app.exception_handler(HTTPError)
    async def on_http_error(request, e: HTTPError):
        return _error_response(e)

    @app.exception_handler(LorakitError)
    async def on_lorakit_error(request, e: LorakitError):
        return _error_response(to_http_error(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        errors = e.errors()
        where = ".".join(str(x) for x in errors[0].get("loc", ())[1:]) if errors else None
        message = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return _error_response(HTTPError(400, f"{where}: {message}" if where else message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(HTTPError(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None)))

    async def read_json(request: HTTPRequest) -> dict:
        """The body: a JSON object within MAX_BODY_BYTES, every string valid Unicode, its fields known to the
        endpoint (FIELDS; see check_fields)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(bytes(raw))
        except (ValueError, RecursionError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        bad = surrogate_field(body)
        if bad is not None:
            _bad(bad, "holds a lone UTF-16 surrogate (\\ud800-\\udfff not in a pair): not valid Unicode text")
        known = FIELDS.get(request.url.path)
        if known is not None:
            check_fields(body, known, lenient)
        return body

    def resolve_model(body: dict) -> str | None:
        """The adapter a request names (None = the base model)."""
        model = body.get("model")
        if model is None or model == "" or model == base_name or model == async_engine.model_name:
            return None
        if not isinstance(model, str):
            _bad("model", "must be a string")
        if model not in async_engine.adapters():
            raise HTTPError(404, f"the model {model[:200]!r} does not exist (not the base model "
                                 f"{base_name!r} nor a loaded adapter)", param="model", code="model_not_found")
        return model

    def check_model(body: dict, derived: str | None, field: str) -> None:
        """`model` beside `merged_adapters` / `retrieve`: absent, the base model's name, or the derived name."""
        model = body.get("model")
        if model in (None, "", base_name, async_engine.model_name) or (derived is not None and model == derived):
            return
        shown = f"left out, the base model's name {base_name!r}" + (f" or {derived!r}" if derived else "")
        _bad("model", f"must be {shown} when the request gives {field}, got {str(model)[:200]!r}")

    def check_sources(sources, field: str) -> None:
        """Every id of a merge is a registered adapter (404 otherwise), not itself a merged one (400)."""
        loaded = async_engine.adapters()
        for ident, _ in sources:
            if parse_derived(ident) is not None:
                _bad(field, f"{ident[:200]!r} is a merged adapter; list the adapters it merges instead")
            if ident not in loaded:
                raise HTTPError(404, f"{field}: the adapter {ident[:200]!r} is not loaded", param=field,
                                code="model_not_found")

    def adapter_plan(body: dict) -> tuple:
        """Which adapter a request wants, checked before any work: ("adapter", name or None), ("merge", sources,
        field), ("retrieve", k, temperature, described adapters) or ("personal", bank, user vector)."""
        merged, retrieve, personal = merged_spec(body), retrieve_spec(body), reclora_spec(body)
        if personal is not None:
            bank, user = banks.get(personal[0]), personal[1]
            if bank is None:
                raise HTTPError(404, f"reclora.bank: no RecLoRA bank {personal[0][:200]!r} (banks: "
                                     f"{', '.join(sorted(banks)) or 'none; --reclora-bank NAME=FOLDER'})",
                                param="reclora.bank", code="model_not_found")
            if len(user) != bank.user_dim:
                _bad("reclora.user", f"bank {bank.name!r} reads user vectors of {bank.user_dim} numbers, "
                                     f"got {len(user)}")
            check_model(body, personal_name(bank.name, user), "reclora")
            return ("personal", bank, user)
        if merged is not None:
            check_sources(merged, "merged_adapters.ids")
            check_model(body, derived_name(merged), "merged_adapters")
            return ("merge", merged, "merged_adapters")
        if retrieve is not None:
            check_model(body, None, "retrieve")
            loaded = async_engine.adapters()
            described = sorted(n for n in retriever.descriptions if n in loaded)
            if not described:
                _bad("retrieve", "no loaded adapter has a description (serve(adapter_descriptions=...), "
                                 "--lora-description NAME=TEXT, or `description` in /v1/load_lora_adapter)")
            if retrieve[0] > len(described):
                _bad("retrieve.k", f"must be at most {len(described)}, the number of described adapters, "
                                   f"got {retrieve[0]}")
            return ("retrieve", *retrieve, described)
        sources = parse_derived(body.get("model"))
        if sources is not None:  # a merged adapter by its derived name: built again if it was evicted
            check_sources(sources, "model")
            return ("merge", sources, "model")
        return ("adapter", resolve_model(body))

    async def choose_adapter(plan: tuple, query_text) -> AdapterChoice:
        """The plan's adapter; builds (or reuses) a merged one, runs retrieval on `query_text()`."""
        if plan[0] == "adapter":
            return AdapterChoice(plan[1])
        if plan[0] == "merge":
            lease = await merges.acquire(plan[1], plan[2])
            return AdapterChoice(lease.name, lease)
        if plan[0] == "personal":
            _, bank, user = plan
            lease = await merges.acquire_built(personal_name(bank.name, user),
                                               functools.partial(personal_lora, bank.folder, user))
            return AdapterChoice(lease.name, lease)
        _, k, temperature, described = plan
        text = query_text()
        try:
            scored = await retriever.rank(text, described)
        except ModelError as e:
            raise HTTPError(500, f"retrieval is unavailable: {e}", type="server_error",
                            code="retrieval_unavailable") from None
        if len(scored) < k:  # adapters were unloaded while the request waited
            _bad("retrieve.k", f"must be at most {len(scored)}, the number of described adapters, got {k}")
        picked = pick(scored, k, temperature)
        extra = {"retrieved": picked}
        if k == 1:
            return AdapterChoice(picked[0]["id"], extra=extra)
        lease = await merges.acquire([(p["id"], p["weight"]) for p in picked], "retrieve")
        return AdapterChoice(lease.name, lease, extra)

    async def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, tokenized on a worker thread (a long prompt must not stall other streams)."""
        if tokenizer is None:
            _bad("prompt", "this server has no tokenizer: send token ids")
        return await asyncio.to_thread(lambda: list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]))

    def check_length(prompt_ids: list[int], params: SamplingParams, prompt_field: str, max_tokens_field: str):
        if not prompt_ids:
            _bad(prompt_field, "must not be empty")
        limit = async_engine.max_model_len
        if len(prompt_ids) >= limit:
            _bad(prompt_field, f"the prompt has {len(prompt_ids)} tokens; this model's context is {limit} tokens")
        if len(prompt_ids) + params.max_tokens > limit:
            _bad(max_tokens_field, f"this model's maximum context length is {limit} tokens; the request needs "
                                   f"{len(prompt_ids) + params.max_tokens} ({len(prompt_ids)} in the prompt, "
                                   f"{params.max_tokens} to generate)")

    async def start(prompt_ids, adapter, params):
        request = Request(prompt_ids=list(prompt_ids), adapter=adapter, params=params,
                          request_id=f"req-{uuid.uuid4().hex}")
        try:
            stream = await async_engine.generate(request)
        except LorakitError as e:
            raise to_http_error(e) from None
        track_stream(stream)
        return stream

    async def texts(stream, prompt_ids, params: SamplingParams, stops: list[str], generated: Generated):
        """(delta, finish_reason, error) for one request, its tokens and log-probs kept in `generated`; closes
        (aborts) its stream when cut short."""
        detok = Detokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        matcher = StopMatcher(stops) if stops else None
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else stop_ids_base)
        try:
            async for out in stream:
                ids = list(out.new_token_ids)
                generated.add(out)
                if out.finish_reason == "stop" and ids and ids[-1] in stop_ids:
                    ids = ids[:-1]  # the stop token is not part of the text (as OpenAI leaves the stop string out)
                delta = detok.add(ids, final=out.finished) if detok else ""
                if matcher is not None:
                    delta, hit = matcher.feed(delta, final=out.finished)
                    if hit:
                        yield delta, "stop", None
                        return
                if out.finished:
                    yield delta, out.finish_reason, out.error
                    return
                if delta:
                    yield delta, None, None
        finally:
            await stream.aclose()

    async def collect(stream, prompt_ids, params, stops, adapter) -> Generated:
        generated = Generated()
        parts, finish, error = [], None, None
        async for delta, finish, error in texts(stream, prompt_ids, params, stops, generated):
            parts.append(delta)
        if finish == "error":
            if adapter is not None and adapter not in async_engine.adapters():  # unloaded while it waited
                raise HTTPError(404, f"the adapter {adapter!r} was unloaded before the request ran ({error})",
                                param="model", code="model_not_found")
            raise HTTPError(500, f"generation failed: {error}", type="server_error", code="generation_error")
        if finish == "abort":
            why = ": the server is shutting down" if async_engine.stopping else ""
            raise HTTPError(503, f"the request was aborted{why}", type="service_unavailable", code="aborted")
        generated.text, generated.finish_reason = "".join(parts), finish
        return generated

    async def generate_all(request: HTTPRequest, jobs: list, adapter, stops) -> list[Generated] | None:
        """Run (prompt_ids, params) jobs side by side; their results in order, or None if the client left. One
        failing (or the client leaving) aborts the others."""
        streams = []
        try:
            for prompt_ids, params in jobs:
                streams.append(await start(prompt_ids, adapter, params))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise

        async def run_all():
            tasks = [asyncio.ensure_future(collect(stream, ids, params, stops, adapter))
                     for stream, (ids, params) in zip(streams, jobs)]
            try:
                return await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                for stream in streams:  # a task cancelled before it ran never closed its stream
                    await stream.aclose()
        return await unless_disconnected(request, run_all())

    async def until_disconnect(request: HTTPRequest):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def unless_disconnected(request: HTTPRequest, coro):
        """Run `coro`; if the client disconnects first, cancel it (its stream aborts, freeing the KV blocks)."""
        task = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task.cancelled():
            return None
        return task.result()

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(payload) -> str:  # ASCII only: clients built on httpx split lines at U+2028, U+0085 and the like
        return f"data: {json.dumps(payload)}\n\n"

    def stream_response(stream, prompt_ids, params, stops, chunk, final_usage: bool, choice: AdapterChoice):
        """SSE chunks `chunk(delta, finish_reason)` then `data: [DONE]`; `choice` is released at the end."""
        async def events():
            generated = Generated()
            try:
                async for delta, finish, error in texts(stream, prompt_ids, params, stops, generated):
                    if finish == "error":
                        yield sse({"error": {"message": f"generation failed: {error}", "type": "server_error",
                                             "param": None, "code": "generation_error"}})
                        break
                    yield sse(chunk(delta, finish))
                    if finish == "abort" and async_engine.stopping:
                        yield sse(SHUTDOWN_EVENT)
                        break
                if final_usage:
                    yield sse(chunk(None, None, usage(len(prompt_ids), len(generated.token_ids))))
                yield "data: [DONE]\n\n"
            finally:
                choice.release()
                await stream.aclose()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def model_label(adapter: str | None) -> str:
        return adapter or base_name

    async def completion_prompts(body: dict) -> list[tuple[str | None, list[int]]]:
        """`prompt` as (text or None, token ids) per prompt: a string, token ids, or a list of those."""
        prompt = body.get("prompt")
        if prompt is None:
            _bad("prompt", "is required")
        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(_is_int(t) for t in prompt))
        if not single and not (isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt)):
            _bad("prompt", "must be a string, a list of token ids, or a list of strings / token-id lists")
        items = [prompt] if single else prompt
        if len(items) > MAX_CHOICES:
            _bad("prompt", f"at most {MAX_CHOICES} prompts per request")
        out = []
        for i, item in enumerate(items):
            field = "prompt" if len(items) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                if len(item) > MAX_BODY_BYTES:
                    _bad(field, "too long")
                out.append((item, await encode(item)))
            else:
                out.append((None, _token_ids(field, item)))
        return out

    def decode(ids: list[int]) -> str:
        if tokenizer is None:
            return ""
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def check_logprobs(token_ids: list[int], entries: list) -> None:
        if len(entries) != len(token_ids):
            raise HTTPError(501, "this engine does not compute log-probabilities", type="server_error",
                            param="logprobs")

    def completion_choice(index: int, prompt: tuple, g: Generated, echo: bool, top_k: int | None,
                          score_only: bool) -> dict:
        """One /v1/completions choice; with `echo` the prompt's text (and log-probs, the first one None) come
        first; `score_only` (echo with max_tokens 0) leaves the generated token out."""
        prompt_text, prompt_ids = prompt
        token_ids, entries, text = ([], [], "") if score_only else (g.token_ids, g.logprobs, g.text)
        if echo:
            text = (prompt_text if prompt_text is not None else decode(prompt_ids)) + text
            if top_k is not None:
                token_ids, entries = prompt_ids + token_ids, list(g.prompt_logprobs or ()) + entries
        logprobs = None
        if top_k is not None:
            check_logprobs(token_ids, entries)
            logprobs = _legacy_logprobs(tokenizer, token_ids, entries)
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": "length" if score_only else g.finish_reason}

    def chat_choice(index: int, g: Generated, top_k: int | None) -> dict:
        logprobs = None
        if top_k is not None:
            check_logprobs(g.token_ids, g.logprobs)
            logprobs = _chat_logprob_content(tokenizer, g.token_ids, g.logprobs)
        return {"index": index, "message": {"role": "assistant", "content": g.text}, "logprobs": logprobs,
                "finish_reason": g.finish_reason}

    def response_body(chat: bool, choice: AdapterChoice, choices: list, use: dict) -> dict:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
               "model": model_label(choice.adapter), "choices": choices, "usage": use}
        if choice.extra is not None:
            out["lorakit"] = choice.extra
        return out

    def prompt_text(prompts: list) -> str:
        """The text `retrieve` compares with the adapters' descriptions: the (single) prompt."""
        if len(prompts) != 1:
            _bad("prompt", "retrieve takes a single prompt (one adapter choice per request)")
        text, ids = prompts[0]
        if text is None:
            if tokenizer is None:
                _bad("prompt", "retrieve needs a text prompt on a server without a tokenizer")
            text = decode(ids)
        return text

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        """Completions of one or more prompts, `n` choices each (choice index = prompt_i * n + j), with `echo`
        and `logprobs` (OpenAI's legacy format; echo + logprobs + max_tokens 0 scores a prompt, as vLLM)."""
        body = await read_json(request)
        _check_unsupported(body)
        plan = adapter_plan(body)
        echo = _opt(body, "echo", "bool", False)
        score_only = echo and _is_int(body.get("max_tokens")) and body["max_tokens"] == 0
        params, stops, streaming = _sampling(dict(body, max_tokens=1) if score_only else body)
        top_k = _completion_logprobs(body)
        include_usage = _include_usage(body)
        prompts = await completion_prompts(body)
        n = _n(body, len(prompts))
        _refuse_multi_stream(streaming, n * len(prompts), echo, top_k)
        params = dataclasses.replace(params, logprobs=top_k, prompt_logprobs=top_k if echo else None)
        for _, prompt_ids in prompts:
            check_length(prompt_ids, params, "prompt", "max_tokens")
        choice = await choose_adapter(plan, lambda: prompt_text(prompts))
        if streaming:
            return await respond_streaming(False, prompts[0][1], choice, params, stops, include_usage)
        try:
            jobs = [(prompt_ids, _seeded(params, j)) for _, prompt_ids in prompts for j in range(n)]
            results = await generate_all(request, jobs, choice.adapter, stops)
        finally:
            choice.release()
        if results is None:
            return Response(status_code=499)
        choices = [completion_choice(i, prompts[i // n], g, echo, top_k, score_only) for i, g in enumerate(results)]
        generated = 0 if score_only else sum(len(g.token_ids) for g in results)
        return response_body(False, choice, choices, usage(sum(len(ids) for _, ids in prompts), generated))

    async def respond_streaming(chat: bool, prompt_ids, choice: AdapterChoice, params, stops, include_usage: bool):
        """The streamed (SSE) response of one completion (`chat` False) or chat completion."""
        try:
            stream = await start(prompt_ids, choice.adapter, params)
        except BaseException:
            choice.release()
            raise
        rid, name = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", model_label(choice.adapter)
        first = [True]

        def chunk(delta, finish, use=None):
            out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": name, "choices": []}
            if delta is not None:
                if chat:
                    part = {"delta": {"role": "assistant", "content": delta} if first[0] else {"content": delta}}
                    first[0] = False
                else:
                    part = {"text": delta}
                out["choices"] = [{"index": 0, **part, "logprobs": None, "finish_reason": finish}]
            if use is not None:
                out["usage"] = use
            if choice.extra is not None:
                out["lorakit"] = choice.extra
            return out
        return stream_response(stream, prompt_ids, params, stops, chunk, include_usage, choice)

    async def chat_prompt(body: dict) -> tuple[list[int], list[dict]]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise HTTPError(400, "this model has no chat template; use /v1/completions", param="messages",
                            code="no_chat_template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            _bad("messages", "must be a non-empty list of {role, content} objects")
        if len(messages) > MAX_MESSAGES:
            _bad("messages", f"at most {MAX_MESSAGES} messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                _bad(f"messages[{i}]", "must be an object with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "developer"):
                _bad(f"messages[{i}].role", "must be one of system, developer, user, assistant")
            if isinstance(content, list):  # OpenAI content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    _bad(f"messages[{i}].content", "only text content parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                _bad(f"messages[{i}].content", "must be a string")
            clean.append({"role": role, "content": content})
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, clean, tokenize=False,
                                           add_generation_prompt=True)
        except Exception as e:  # a template may raise on message order (jinja's raise_exception)
            raise HTTPError(400, f"messages: the chat template refused them: {str(e)[:300]}",
                            param="messages") from None
        return await encode(text, add_special_tokens=False), clean

    def last_user_message(messages: list[dict]) -> str:
        """The text `retrieve` compares with the adapters' descriptions: the chat's last user message."""
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if not text:
            _bad("messages", "retrieve needs a non-empty user message to compare with the adapters' descriptions")
        return text

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_json(request)
        _check_unsupported(body)
        plan = adapter_plan(body)
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params, stops, streaming = _sampling(body, field)
        include_usage = _include_usage(body)
        top_k, n = _chat_logprobs(body), _n(body, 1)
        _refuse_multi_stream(streaming, n, False, top_k)
        params = dataclasses.replace(params, logprobs=top_k)
        prompt_ids, messages = await chat_prompt(body)
        if body.get(field) is None:  # as OpenAI and vLLM: up to the end of the context
            rest = async_engine.max_model_len - len(prompt_ids)
            params = dataclasses.replace(params, max_tokens=max(rest, 1))
        check_length(prompt_ids, params, "messages", field)
        choice = await choose_adapter(plan, lambda: last_user_message(messages))
        if streaming:
            return await respond_streaming(True, prompt_ids, choice, params, stops, include_usage)
        try:
            jobs = [(prompt_ids, _seeded(params, j)) for j in range(n)]
            results = await generate_all(request, jobs, choice.adapter, stops)
        finally:
            choice.release()
        if results is None:
            return Response(status_code=499)
        choices = [chat_choice(j, g, top_k) for j, g in enumerate(results)]
        return response_body(True, choice, choices, usage(len(prompt_ids), sum(len(g.token_ids) for g in results)))

    @app.get("/v1/models")
    async def models():
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorakit",
                 "root": async_engine.model_dir or base_name, "parent": None}]
        for name, path in sorted(async_engine.adapters().items()):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": path,
                         "parent": base_name})
        return {"object": "list", "data": data}

    def adapter_name(body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str):
            _bad("lora_name", "is required (a string)")
        if not ADAPTER_NAME.match(name):
            _bad("lora_name", "must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
        return name

    def adapter_path(body: dict) -> str:
        path = body.get("lora_path")
        if not isinstance(path, str) or not path:
            _bad("lora_path", "is required (a string)")
        if "\x00" in path or len(path) > 4096:
            _bad("lora_path", "is not a valid path")
        real = os.path.realpath(path)  # relative paths: from the working directory, as --lora-modules
        where = f"lora_path {path[:300]!r} (resolved to {real!r})"
        if not roots:
            raise HTTPError(403, f"{where}: loading adapters at runtime is disabled (no --adapter-root)",
                            param="lora_path", type="permission_error")
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise HTTPError(403, f"{where}: not inside an allowed adapter root ({', '.join(roots)})",
                            param="lora_path", type="permission_error")
        if not os.path.isdir(real):
            raise HTTPError(400, f"{where}: is not a directory", param="lora_path")
        return real

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HTTPRequest):
        body = await read_json(request)
        name = adapter_name(body)
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or not description.strip()
                                        or len(description) > MAX_DESCRIPTION_CHARS):
            _bad("description", f"must be a non-empty string of at most {MAX_DESCRIPTION_CHARS} characters")
        path = adapter_path(body)
        if name in (base_name, async_engine.model_name):
            _bad("lora_name", "is the base model's name")
        if name in async_engine.adapters():
            _bad("lora_name", f"the adapter {name!r} is already loaded")
        try:
            await asyncio.to_thread(read_adapter, path)  # every value checked (finite), not only the header
            await async_engine.load_adapter(name, path)
        except (AdapterNameError, AdapterFileError, ConfigError) as e:
            field = "lora_name" if isinstance(e, AdapterNameError) else "lora_path"
            raise HTTPError(400, f"{field}: adapter {name!r} at {path!r} cannot be loaded: {e}",
                            param=field) from None
        if description is not None:
            retriever.describe(name, description)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HTTPRequest):
        body = await read_json(request)
        lora_name = body.get("lora_name")
        if parse_derived(lora_name) is not None or isinstance(lora_name, str) and PERSONAL_NAME_RE.match(lora_name):
            _bad("lora_name", "is a merged or per-user adapter: the server keeps those in a bounded cache and "
                              "unloads them itself")
        name = adapter_name(body)
        if name not in async_engine.adapters():
            raise HTTPError(404, f"the adapter {name!r} is not loaded", param="lora_name", code="model_not_found")
        try:
            await async_engine.unload_adapter(name)
        except UnknownAdapterError as e:
            raise HTTPError(404, str(e), param="lora_name", code="model_not_found") from None
        retriever.forget(name)
        await merges.forget_source(name)  # merges of it would otherwise outlive it under its name
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/health")
    async def health():
        if not async_engine.healthy:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(async_engine.metrics(), stats),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    if classifier is not None:
        _mount_classify(app, classifier, read_json, base_name)
    return app


def _mount_classify(app, classifier, read_json, base_name: str) -> None:
    """POST /v1/classify {"model": adapter-or-base, "input": str | list[str]} -> class probabilities per text."""
    classifier_base = getattr(classifier, "model_name", None)

    @app.post("/v1/classify")
    async def classify(request: HTTPRequest):
        body = await read_json(request)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            _bad("model", "must be a string")
        adapter = None if model in (None, "", base_name, classifier_base) else model
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            _bad("input", "must be a string or a non-empty list of strings")
        if len(texts) > 1024:
            _bad("input", "at most 1024 texts per request")
        try:
            result = classifier.classify(texts, [adapter] * len(texts))
            if inspect.isawaitable(result):
                result = await result
        except LorakitError as e:
            raise to_http_error(e) from None
        if hasattr(result, "tolist"):
            result = result.tolist()
        labels_for = getattr(classifier, "labels_for", None)
        labels = labels_for(adapter) if labels_for is not None else getattr(classifier, "labels", None)
        data = []
        for i, row in enumerate(result):
            if hasattr(row, "tolist"):
                row = row.tolist()
            item = {"index": i, "object": "classification", "probs": row}
            if isinstance(row, list) and row and all(isinstance(p, (int, float)) for p in row):
                best = max(range(len(row)), key=row.__getitem__)
                item["label"] = labels[best] if isinstance(labels, (list, tuple)) and best < len(labels) else best
            data.append(item)
        return {"object": "list", "model": model or classifier_base or base_name, "data": data}


_METRIC_HELP = [  # (exposed name, engine key, type, help)
    ("lorakit_queue_depth", "waiting", "gauge", "Requests waiting to be scheduled."),
    ("lorakit_running", "running", "gauge", "Requests running (holding KV blocks)."),
    ("lorakit_prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens processed."),
    ("lorakit_generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("lorakit_generation_tokens_per_second", "generation_tokens_per_s", "gauge",
     "Tokens generated per second over the last 10 s."),
    ("lorakit_requests_finished_total", "requests_finished_total", "counter", "Requests the engine finished."),
    ("lorakit_preemptions_total", "preemptions_total", "counter", "Requests preempted (blocks freed, recomputed)."),
    ("lorakit_adapter_cache_hits_total", "adapter_cache_hits_total", "counter", "Adapter lookups found in RAM."),
    ("lorakit_adapter_cache_misses_total", "adapter_cache_misses_total", "counter", "Adapter loads from disk."),
    ("lorakit_adapter_evictions_total", "adapter_evictions_total", "counter", "Adapters evicted from RAM."),
    ("lorakit_adapters_loaded", "adapters_loaded", "gauge", "Adapters resident in RAM."),
    ("lorakit_adapter_bytes_loaded", "adapter_bytes_loaded", "gauge", "Bytes of adapter weights in RAM."),
    ("lorakit_kv_blocks_used", "kv_blocks_used", "gauge", "KV-cache blocks in use."),
    ("lorakit_kv_blocks_total", "kv_blocks_total", "gauge", "KV-cache blocks in the pool."),
    ("lorakit_step_errors_total", "step_errors_total", "counter", "Engine steps that raised."),
]


def prometheus_text(m: dict, stats: HTTPStats) -> str:
    """Prometheus text exposition (0.0.4) of the engine metrics and the server's HTTPStats."""
    lines = []
    for name, key, kind, text in _METRIC_HELP:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_num(m.get(key, 0.0))}"]
    lines += ["# HELP lorakit_request_finish_total Requests finished, by finish reason.",
              "# TYPE lorakit_request_finish_total counter"]
    for reason in ("stop", "length", "abort", "error"):
        lines.append(f'lorakit_request_finish_total{{reason="{reason}"}} {_num(m.get(f"requests_{reason}_total", 0))}')
    lines += ["# HELP lorakit_request_rejected_total Requests refused at admission, by reason.",
              "# TYPE lorakit_request_rejected_total counter"]
    for kind in ("queue_full", "unknown_adapter", "capacity", "invalid", "stopped"):
        lines.append(f'lorakit_request_rejected_total{{reason="{kind}"}} {_num(m.get(f"rejected_{kind}_total", 0))}')
    lines += ["# HELP lorakit_http_requests_total HTTP responses on /v1/ endpoints, by status code.",
              "# TYPE lorakit_http_requests_total counter"]
    for code, count in sorted(dict(stats.statuses).items()):
        lines.append(f'lorakit_http_requests_total{{status="{code}"}} {count}')
    lines += ["# HELP lorakit_model_requests_total Generation requests, by model (adapter or base model).",
              "# TYPE lorakit_model_requests_total counter"]
    for model, count in sorted(dict(stats.per_model).items()):
        lines.append(f'lorakit_model_requests_total{{model="{_label(model)}"}} {count}')
    lines += stats.ttft.lines("lorakit_time_to_first_token_seconds",
                              "Seconds from a request's admission to its first token.")
    lines += stats.latency.lines("lorakit_e2e_request_latency_seconds",
                                 "Seconds from receiving a generation request to the end of its response.")
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


# ------------------------------------------------------------------ process entry point
def parse_lora_modules(values: list[str]) -> dict[str, str]:
    """`name=path` items or vLLM's JSON form `{"name": ..., "path": ...}` -> {name: path}."""
    modules: dict[str, str] = {}
    for item in values or []:
        text = item.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"--lora-modules {item!r}: not valid JSON ({e})") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
                    not isinstance(spec.get("path"), str):
                raise ConfigError(f"--lora-modules {item!r}: the JSON form needs string keys 'name' and 'path'")
            name, path = spec["name"], spec["path"]
        else:
            name, sep, path = text.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora-modules {item!r}: expected name=path or JSON {{\"name\", \"path\"}}")
        if not ADAPTER_NAME.match(name):
            raise AdapterNameError(f"--lora-modules: adapter name {name!r} must match {ADAPTER_NAME.pattern}")
        if name in modules:
            raise AdapterNameError(f"--lora-modules: adapter name {name!r} given twice")
        modules[name] = path
    return modules


def parse_lora_descriptions(values: list[str]) -> dict[str, str]:
    """`name=text` items (--lora-description) -> {name: text}."""
    descriptions: dict[str, str] = {}
    for item in values or []:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise ConfigError(f"--lora-description {item[:100]!r}: expected NAME=TEXT")
        if not ADAPTER_NAME.match(name):
            raise AdapterNameError(f"--lora-description: adapter name {name!r} must match {ADAPTER_NAME.pattern}")
        if name in descriptions:
            raise ConfigError(f"--lora-description: adapter {name!r} is described twice")
        if len(text) > MAX_DESCRIPTION_CHARS:
            raise ConfigError(f"--lora-description {name}: at most {MAX_DESCRIPTION_CHARS} characters")
        descriptions[name] = text
    return descriptions


def serve(model_dir: str, lora_modules: dict[str, str] | None = None, *, engine_config=None,
          adapter_roots: list[str] | None = None, served_name: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, shutdown_timeout: float = 30.0, log_level: str = "info",
          classify_model: str | None = None, classify_modules: dict[str, str] | None = None,
          classify_labels: int = 2, lenient: bool = False, adapter_descriptions: dict[str, str] | None = None,
          max_merged_adapters: int = 8, reclora_banks: dict[str, str] | None = None) -> None:
    """Bind host:port (a busy port fails at once), load the model, register `lora_modules` (name -> path), and
    serve until SIGINT/SIGTERM.

    `model_dir`: a local transformers directory or a model lorakit knows by name ("smollm2").
    `adapter_roots` default to the parent directories of the `lora_modules` paths. `classify_model` (an encoder
    directory or "minilm") adds POST /v1/classify, with `classify_modules` (name -> path) as per-request adapters.
    On SIGTERM running requests get `shutdown_timeout` s; then they get a 503 (streams an error event).
    `adapter_descriptions` (name -> text, names among `lora_modules`) serve `retrieve` requests (MiniLM is loaded
    at the first one); `max_merged_adapters` bounds the merged adapters `merged_adapters` requests build (LRU).
    `reclora_banks` (name -> folder of a saved RecLoRA adapter) serve `reclora` requests {bank, user}.
    """
    from .async_engine import AsyncEngine
    from .config import EngineConfig
    from .engine import Engine
    from .model_dir import load_tokenizer, resolve_model_dir

    configure_logging(log_level)
    lora_modules = dict(lora_modules or {})
    unknown = sorted(set(adapter_descriptions or {}) - set(lora_modules))
    if unknown:
        raise ConfigError(f"--lora-description {unknown[0]}: no such adapter in --lora-modules")
    if isinstance(max_merged_adapters, bool) or not isinstance(max_merged_adapters, int) or max_merged_adapters < 1:
        raise ConfigError(f"--max-merged-adapters must be an integer >= 1, got {max_merged_adapters!r}")
    if adapter_roots is None:
        adapter_roots = sorted({str(Path(p).absolute().parent) for p in lora_modules.values()})
    directory, _ = resolve_model_dir(model_dir)
    sock = bind_socket(host, port)
    try:
        engine = Engine.from_dir(model_dir, engine_config or EngineConfig())
        try:
            for name, path in lora_modules.items():
                engine.register_adapter(name, path)
        except BaseException:
            engine.close()
            raise
        try:
            tokenizer = load_tokenizer(model_dir)
        except LorakitError as e:
            log.warning("%s; only token-id prompts will work", e)
            tokenizer = None
        classifier = None
        if classify_model is not None:
            from .classify import AsyncClassifier, Classifier

            encoder = Classifier(classify_model, num_labels=classify_labels)
            for name, path in (classify_modules or {}).items():
                encoder.register_adapter(name, path)
            classifier = AsyncClassifier(encoder)
            log.info("classifier %s (labels %s), adapters: %s", encoder.model_name, encoder.labels,
                     ", ".join(f"{n}={p}" for n, p in encoder.adapters().items()) or "none")
        log_startup(engine, str(directory.absolute()), served_name, adapter_roots)
        async_engine = AsyncEngine(engine)
        async_engine.model_dir = str(directory.absolute())  # the base model's `root` in /v1/models
        app = build_app(async_engine, tokenizer, adapter_roots=adapter_roots, served_name=served_name,
                        shutdown_timeout=shutdown_timeout, classifier=classifier, lenient=lenient,
                        adapter_descriptions=adapter_descriptions, max_merged_adapters=max_merged_adapters,
                        reclora_banks=reclora_banks)
        run_server(app, sock, host=host, port=port, log_level=log_level, shutdown_timeout=shutdown_timeout)
    finally:
        sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (ConfigError naming them when the port is taken or the host unknown)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server on that port? choose "
                          f"another with --port)") from None
    sock.set_inheritable(True)
    return sock


def configure_logging(level: str) -> None:
    """Send lorakit's log records (startup, access lines) to stderr as uvicorn prints its own."""
    logger = logging.getLogger("lorakit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record."""

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def log_startup(engine, directory: str, served_name: str | None, adapter_roots: list[str]) -> None:
    """One line for the model and its KV cache, one per registered adapter, one for the adapter roots."""
    m, cfg = engine.metrics(), engine.config
    blocks = int(m.get("kv_blocks_total", 0))
    log.info("model %s (%s): context %d tokens, KV cache %d blocks x %d tokens (%d tokens), memory budget %.2f GiB, "
             "max_num_seqs %d, max_loras %d", served_name or engine.model_name, directory, engine.max_model_len,
             blocks, cfg.block_size, blocks * cfg.block_size, cfg.memory_bytes / (1 << 30), cfg.max_num_seqs,
             cfg.max_loras)
    adapters = engine.adapters()
    for name, path in sorted(adapters.items()):
        log.info("adapter %s: %s", name, path)
    log.info("%d adapter(s) registered; /v1/load_lora_adapter loads from: %s", len(adapters),
             ", ".join(adapter_roots) or "nowhere (no --adapter-root)")


def run_server(app, sock: socket.socket, **options) -> None:
    """Serve `app` on the bound socket until SIGINT/SIGTERM (see http_server)."""
    http_server(app, **options).run(sockets=[sock])


def http_server(app, *, host: str, port: int, log_level: str, shutdown_timeout: float):
    """A uvicorn Server for `app`. On SIGINT/SIGTERM the engine's drain starts at once, so requests still running
    after `shutdown_timeout` get their 503 / error event before uvicorn's own (longer) grace period would cancel
    them; lorakit writes the access log (adapter, tokens, latency), so uvicorn's is off."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(shutdown_timeout) + 20)
    return Server(config)
