"""Sequence classification with a per-request adapter: the backend of `/v1/classify` (encoder models, e.g. MiniLM).

`Classifier` holds one encoder (`AutoModelForSequenceClassification`) and any number of lorakit/PEFT adapters
(each may carry its own classifier head as `modules_to_save`). `classify(texts, adapters)` runs ONE batched
forward in which every row uses its own adapter (`lorakit.route`); None / "__base__" means the base model with
the base head (random, drawn from `seed`, unless the directory has one). Texts longer than the model's context
are truncated to it.

`AsyncClassifier` micro-batches concurrent requests: it waits up to `max_wait_ms` for more requests after the
first one (or until `max_batch_size` texts; a larger request is split into chunks of that size), runs the batch on one worker thread (which also does every
register/unregister, so the model never changes under a forward), and resolves each request's future. At most
`max_queue` chunks wait; past that `classify` raises QueueFullError at once. If a batch fails, its requests are
rerun one by one so that only the faulty request fails.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import (AdapterNameError, EngineStoppedError, ModelError, QueueFullError, RequestError,
                      UnknownAdapterError)
from ..routing import BASE


class Classifier:
    """One encoder classifier + named adapters; thread-safe (one lock around forwards and adapter changes)."""

    def __init__(self, model_dir: str | os.PathLike, num_labels: int = 2, seed: int = 0, max_chars: int = 100_000):
        from ..models import load_model

        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise ModelError(f"num_labels must be an integer >= 2 (probabilities over labels), got {num_labels!r}")
        self.model, self.tokenizer = load_model(str(model_dir), "classification", num_labels=num_labels, seed=seed)
        self.model.requires_grad_(False)
        self.num_labels = num_labels
        self.model_name = "minilm" if str(model_dir) == "minilm" else Path(model_dir).name
        id2label = getattr(self.model.config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]
        self.max_chars = max_chars
        limits = [n for n in (getattr(self.tokenizer, "model_max_length", None),
                              getattr(self.model.config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else 512
        self._adapters: dict[str, str] = {}  # name -> path
        self._labels: dict[str, list[str]] = {}  # name -> label names saved with the adapter
        self._lock = threading.Lock()

    def adapters(self) -> dict[str, str]:
        """Registered adapters: name -> path."""
        return dict(self._adapters)

    def register_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a lorakit/PEFT adapter folder as `name` (AdapterNameError, AdapterFileError, ConfigError), with
        the label names saved in its header (`lorakit.io.files.read_labels`), if any."""
        from ..io import load_adapter
        from ..io.files import read_labels

        with self._lock:
            if name in self._adapters:  # lorakit.load_adapter would hot-swap; the API wants an explicit unload
                raise AdapterNameError(f"adapter {name!r} is already registered (unload it first)")
            saved = read_labels(path) or {}
            load_adapter(self.model, path, name)
            self._adapters[name] = str(path)
            if saved:
                self._labels[name] = [saved.get(i, default) for i, default in enumerate(self.labels)]

    def labels_for(self, adapter: str | None) -> list[str]:
        """The label names of `adapter`'s head: those saved with it, else the base model's (e.g. LABEL_0)."""
        return self._labels.get(adapter, self.labels)

    def unregister_adapter(self, name: str) -> None:
        """Remove adapter `name` (UnknownAdapterError if it is not registered)."""
        from ..model import delete_adapter

        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapterError(f"unknown adapter {name!r}; registered: {sorted(self._adapters)}")
            delete_adapter(self.model, name)
            del self._adapters[name]
            self._labels.pop(name, None)

    def validate(self, texts, adapters=None) -> tuple[list[str], list[str]]:
        """Checked copies of a request: (texts, one adapter name per text, "__base__" for None).

        RequestError (field "input" or "adapters") for malformed values, UnknownAdapterError for unknown names.
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise RequestError(f"input must be a list of strings, got {type(texts).__name__}", field="input")
        if not texts:
            raise RequestError("input must hold at least one text", field="input")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise RequestError(f"input[{i}] must be a string, got {type(t).__name__}", field="input")
            if len(t) > self.max_chars:
                raise RequestError(f"input[{i}] has {len(t)} characters, more than the limit {self.max_chars}",
                                   field="input")
        if adapters is None:
            adapters = [None] * len(texts)
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)):
            raise RequestError(f"adapters must be a list of adapter names or nulls, got {type(adapters).__name__}",
                               field="adapters")
        if len(adapters) != len(texts):
            raise RequestError(f"adapters has {len(adapters)} entries for {len(texts)} texts; give one per text",
                               field="adapters")
        names = []
        for i, a in enumerate(adapters):
            if a is not None and not isinstance(a, str):
                raise RequestError(f"adapters[{i}] must be a string or null, got {type(a).__name__}",
                                   field="adapters")
            name = BASE if a is None else a
            if name != BASE and name not in self._adapters:
                raise UnknownAdapterError(f"unknown adapter {name!r}; registered: {sorted(self._adapters)}")
            names.append(name)
        return list(texts), names

    def classify(self, texts: list[str], adapters: list[str | None] | None = None) -> list[list[float]]:
        """Label probabilities for each text, each row with its own adapter (None = base), in one forward."""
        from ..routing import route

        with self._lock, torch.inference_mode():  # the lock: no adapter change (or tokenizer reuse) mid-batch
            texts, names = self.validate(texts, adapters)
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            with route(self.model, adapter_names=names):
                logits = self.model(**batch).logits
        return torch.softmax(logits.float(), dim=-1).tolist()


@dataclass
class _Job:
    texts: list[str]
    adapters: list[str]
    future: asyncio.Future


class AsyncClassifier:
    """Micro-batching front of a `Classifier` for an asyncio server (use it from one event loop)."""

    def __init__(self, classifier: Classifier, max_batch_size: int = 32, max_wait_ms: float = 2.0,
                 max_queue: int = 256, max_texts_per_request: int = 1024):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("max_texts_per_request", max_texts_per_request)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.classifier = classifier
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.max_texts_per_request = max_texts_per_request
        self.model_name, self.labels = classifier.model_name, classifier.labels
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lorakit-classify")
        self._task: asyncio.Task | None = None
        self._closed = False
        self.batches = 0  # forwards run (for metrics and tests)

    def queue_depth(self) -> int:
        return len(self._pending)

    def adapters(self) -> dict[str, str]:
        return self.classifier.adapters()

    def labels_for(self, adapter: str | None) -> list[str]:
        return self.classifier.labels_for(adapter)

    async def classify(self, texts: list[str], adapters: list[str | None] | None = None) -> list[list[float]]:
        """Probabilities per text; raises RequestError / UnknownAdapterError / QueueFullError / EngineStoppedError."""
        if self._closed:
            raise EngineStoppedError("the classifier is shutting down")
        texts, names = self.classifier.validate(texts, adapters)
        if len(texts) > self.max_texts_per_request:
            raise RequestError(f"input has {len(texts)} texts, more than the limit {self.max_texts_per_request} "
                               f"per request", field="input")
        starts = range(0, len(texts), self.max_batch_size)
        if len(self._pending) + len(starts) > self.max_queue:
            raise QueueFullError(f"{len(self._pending)} classify batches are waiting (limit {self.max_queue}); "
                                 f"retry later")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run())
        jobs = [_Job(texts[i:i + self.max_batch_size], names[i:i + self.max_batch_size], loop.create_future())
                for i in starts]
        self._pending.extend(jobs)
        self._wake.set()
        parts = await asyncio.gather(*(j.future for j in jobs))
        return [row for part in parts for row in part]

    async def register_adapter(self, name: str, path: str | os.PathLike) -> None:
        """`Classifier.register_adapter` on the worker thread (between batches)."""
        await self._in_worker(self.classifier.register_adapter, name, path)

    async def unregister_adapter(self, name: str) -> None:
        """`Classifier.unregister_adapter` on the worker thread; queued requests naming it fail with 404."""
        await self._in_worker(self.classifier.unregister_adapter, name)

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker thread."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=False)

    async def _in_worker(self, fn, *args):
        if self._closed:
            raise EngineStoppedError("the classifier is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = loop.time() + self.max_wait
            while not self._closed and self._texts_waiting() < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._execute(loop, batch)

    def _texts_waiting(self) -> int:
        return sum(len(j.texts) for j in self._pending if not j.future.done())

    def _take(self) -> list[_Job]:
        batch, size = [], 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # the client went away
                self._pending.popleft()
                continue
            if batch and size + len(job.texts) > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            size += len(job.texts)
        return batch

    async def _execute(self, loop, batch: list[_Job]) -> None:
        texts = [t for j in batch for t in j.texts]
        names = [n for j in batch for n in j.adapters]
        try:
            probs = await loop.run_in_executor(self._executor, self.classifier.classify, texts, names)
            self.batches += 1
        except Exception as e:  # noqa: BLE001 — handed to the requests' futures
            if len(batch) == 1:
                _resolve(batch[0].future, error=e)
                return
            for job in batch:  # rerun alone: only the faulty request fails
                await self._execute(loop, [job])
            return
        start = 0
        for job in batch:
            _resolve(job.future, result=probs[start:start + len(job.texts)])
            start += len(job.texts)


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
