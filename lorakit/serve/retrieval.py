"""Adapter retrieval by description for the server's `retrieve` request field.

Each described adapter's text and the request's text are embedded with the all-MiniLM-L6-v2 encoder
(`lorakit.models.minilm_dir()`; the mean of the last hidden states over real tokens, as
`lorakit.train.baseline.mean_pooled`, then L2-normalised), and adapters are ranked by cosine similarity. The encoder
is loaded on the first retrieval (never at start-up), once; description embeddings are computed once per text.
"""
from __future__ import annotations

import asyncio
import math
import threading

from ..models import load_minilm
from ..train.baseline import mean_pooled

MAX_LENGTH = 256  # tokens of a text the encoder sees (all-MiniLM-L6-v2 was trained on up to 256)
WEIGHT_DECIMALS = 4  # softmax weights are rounded so that near-equal retrievals share one merged adapter


def pick(scored: list[tuple[str, float]], k: int, temperature: float) -> list[dict]:
    """The k best (name, score) pairs as [{"id", "score", "weight"}]: weight 1.0 for k = 1, else
    softmax(score / temperature) over the k, rounded to WEIGHT_DECIMALS decimals."""
    best = sorted(scored, key=lambda item: (-item[1], item[0]))[:k]
    if k == 1:
        return [{"id": best[0][0], "score": best[0][1], "weight": 1.0}]
    top = max(score for _, score in best)
    exps = [math.exp((score - top) / temperature) for _, score in best]
    total = sum(exps)
    return [{"id": name, "score": score, "weight": round(e / total, WEIGHT_DECIMALS)}
            for (name, score), e in zip(best, exps)]


class Retriever:
    """Adapter descriptions and the encoder that compares a request's text with them.

    `load` returns (encoder, tokenizer) (default: all-MiniLM-L6-v2 from `minilm_dir()`); `loads` counts how often
    it ran (1 after the first retrieval)."""

    def __init__(self, descriptions: dict[str, str] | None = None, load=None):
        self.descriptions: dict[str, str] = dict(descriptions or {})
        self._load = load or load_minilm
        self.encoder = self.tokenizer = None
        self.loads = 0
        self._loading: asyncio.Task | None = None
        self._vectors: dict = {}  # description text -> its unit embedding (a tensor)
        self._lock = threading.Lock()  # one forward at a time (fast tokenizers refuse concurrent use)

    def describe(self, name: str, text: str) -> None:
        self.descriptions[name] = text

    def forget(self, name: str) -> None:
        self.descriptions.pop(name, None)

    async def rank(self, text: str, names: list[str]) -> list[tuple[str, float]]:
        """(name, cosine similarity of its description with `text`) for each of `names` that is described."""
        await self._ready()
        names = [n for n in names if n in self.descriptions]  # one may have been unloaded meanwhile
        texts = [self.descriptions[n] for n in names]
        return await asyncio.to_thread(self._scores, text, names, texts)

    async def _ready(self) -> None:
        if self.encoder is not None:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load_once))
        task = self._loading
        try:
            await asyncio.shield(task)
        except BaseException:
            if task.done() and self._loading is task:
                self._loading = None  # a failed load is retried by the next request
            raise

    def _load_once(self) -> None:
        encoder, tokenizer = self._load()
        self.loads += 1
        self.encoder, self.tokenizer = encoder, tokenizer

    def _scores(self, text: str, names: list[str], texts: list[str]) -> list[tuple[str, float]]:
        with self._lock:
            new = sorted({t for t in texts if t not in self._vectors})
            vectors = self._embed([text] + new)
            self._vectors.update(zip(new, vectors[1:]))
            query = vectors[0]
            return [(n, float(self._vectors[t] @ query)) for n, t in zip(names, texts)]

    def _embed(self, texts: list[str]):
        import torch

        pooled = mean_pooled(self.encoder, self.tokenizer, texts, max_length=MAX_LENGTH, progress=False)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)
