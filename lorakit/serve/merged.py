"""Weighted merges of registered adapters, built on request and cached by the server (LoRAX's `merged_adapters`).

A request naming adapters a, b with weights 0.7, 0.3 is served by ONE adapter whose ΔW is exactly 0.7·ΔW_a +
0.3·ΔW_b: `merge_folders(..., method="cat")` stacks the factors (rank Σrᵢ per layer, each source's own scale folded
in) into a plain PEFT folder under a server-owned temporary directory, which the engine registers like any adapter
under a derived name, `merge:a=0.7,b=0.3` (ids in sorted order, each weight as Python's shortest round-trip repr
of the float, -0.0 written 0.0). That name is its own cache key: equal requests share one build (concurrent ones
await the same task), and `MergeCache` keeps at most `max_entries` of them, evicting the least recently used one
that no request holds (unregistered from the engine, its folder deleted). A request holds its merged adapter (a
`Lease`) until its response ends, so an eviction never fails a queued request.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import re
import shutil
import tempfile
import weakref
from pathlib import Path

from ..errors import RequestError, UnknownAdapterError

log = logging.getLogger(__name__)

PREFIX = "merge:"
MAX_SOURCES = 64  # adapters in one merge
# a derived name: ':', '=' and ',' never occur in a user's adapter name (adapters.NAME_RE), so the two cannot collide
_ITEM = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}=[-+.0-9e]{1,32}"
MERGED_NAME_RE = re.compile(rf"^merge:{_ITEM}(?:,{_ITEM}){{0,{MAX_SOURCES - 1}}}$")
STRATEGIES = ("linear",)


def canonical(sources) -> tuple[tuple[str, float], ...]:
    """(id, weight) pairs sorted by id, weights as floats (-0.0 as 0.0)."""
    return tuple(sorted((str(i), float(w) + 0.0) for i, w in sources))


def derived_name(sources) -> str:
    """The deterministic adapter name of a merge: `merge:a=0.7,b=0.3` (see the module docstring)."""
    return PREFIX + ",".join(f"{i}={w!r}" for i, w in canonical(sources))


def parse_derived(name) -> tuple[tuple[str, float], ...] | None:
    """The canonical (id, weight) pairs a derived name stands for, or None when `name` is not one exactly as
    `derived_name` writes it (sorted distinct ids, canonical finite weights)."""
    if not isinstance(name, str) or not MERGED_NAME_RE.match(name):
        return None
    pairs = []
    for item in name[len(PREFIX):].split(","):
        ident, _, text = item.partition("=")
        try:
            weight = float(text)
        except ValueError:
            return None
        pairs.append((ident, weight))
    if not all(math.isfinite(w) for _, w in pairs) or derived_name(pairs) != name or \
            len({i for i, _ in pairs}) != len(pairs):
        return None
    return tuple(pairs)


def merged_ranks(folders) -> dict[str, int]:
    """{module path: Σ rank} over PEFT LoRA folders (the rank each layer of their `cat` merge has), read from the
    safetensors headers only."""
    from safetensors import safe_open

    ranks: collections.Counter = collections.Counter()
    for folder in folders:
        with safe_open(str(Path(folder) / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                if key.endswith(".lora_A.weight"):
                    path = re.sub(r"^base_model\.model\.", "", key[:-len(".lora_A.weight")])
                    ranks[path] += f.get_slice(key).get_shape()[0]
    return dict(ranks)


@dataclasses.dataclass
class _Entry:
    name: str
    sources: tuple[tuple[str, float], ...]
    folder: Path


class Lease:
    """A request's hold on a merged adapter: it is not evicted before `release()` (idempotent; also run when the
    lease is garbage-collected, so a response dropped before it ran cannot pin the adapter forever)."""

    def __init__(self, cache: "MergeCache", name: str):
        self.name = name
        self._finalizer = weakref.finalize(self, cache._release, name)

    def release(self) -> None:
        self._finalizer()


class MergeCache:
    """Merged adapters of an AsyncEngine, built once per derived name, at most `max_entries` kept (LRU).

    `max_rank`: the engine's max_lora_rank (a merge whose Σrᵢ on some layer exceeds it is refused before it is
    built). `builds` counts merges built; `merge` is the function that builds one (merge_folders' signature).
    """

    def __init__(self, async_engine, max_entries: int = 8, max_rank: int | None = None, merge=None):
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self.engine, self.max_entries, self.max_rank = async_engine, max_entries, max_rank
        self._merge = merge
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # least recent first
        self._building: dict[str, asyncio.Task] = {}
        self._users: collections.Counter = collections.Counter()  # name -> leases (and waiters for a build)
        self._retired: dict[str, _Entry] = {}  # unregistered while held: folder deleted at the last release
        self._root: Path | None = None
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.builds = 0
        self.evictions = 0

    # ---- requests -------------------------------------------------------------------------------------------
    async def acquire(self, sources, field: str = "merged_adapters") -> Lease:
        """A lease on the merged adapter of `sources` ((id, weight) pairs of registered adapters), built (once)
        if it is not cached. `field` names the request field in a rank-limit error."""
        sources = canonical(sources)
        return await self._lease(derived_name(sources), sources, field, None)

    async def acquire_built(self, name: str, write) -> Lease:
        """A lease on adapter `name`, built once by `write(folder)` (run on a worker thread; it writes a plain LoRA
        folder that depends on no registered adapter: e.g. one user's adapter from a RecLoRA bank) when it is not
        cached. Cached, leased and evicted as merges are."""
        return await self._lease(name, (), "model", write)

    async def _lease(self, name: str, sources, field: str, write) -> Lease:
        self._loop = asyncio.get_running_loop()
        self._users[name] += 1
        try:
            while True:
                entry = self._entries.get(name)
                if entry is not None:
                    if name in self.engine.adapters():
                        self._entries.move_to_end(name)
                        return Lease(self, name)
                    self._entries.pop(name)  # unregistered behind our back: build it again
                    self._delete(entry)
                task = self._building.get(name)
                if task is None:
                    task = asyncio.ensure_future(self._build(name, sources, field, write))
                    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waiters may all have left
                    self._building[name] = task
                await asyncio.shield(task)  # a client leaving does not cancel a build others may wait for
        except BaseException:
            self._release(name)
            raise

    def entries(self) -> dict[str, dict]:
        """{derived name: {"ids": [...], "weights": [...], "path": folder}} of the cached merges, least recently
        used first."""
        return {n: {"ids": [i for i, _ in e.sources], "weights": [w for _, w in e.sources], "path": str(e.folder)}
                for n, e in self._entries.items()}

    def held(self) -> dict[str, int]:
        """{derived name: requests holding it (or waiting for its build)}."""
        return {n: c for n, c in self._users.items() if c > 0}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    async def forget_source(self, adapter: str) -> None:
        """Drop the merges built from `adapter` (it was unloaded: they would no longer match its name)."""
        for name, entry in list(self._entries.items()):
            if adapter in (i for i, _ in entry.sources):
                self._entries.pop(name)
                await self._unregister(entry)

    def close(self) -> None:
        """Delete the server's merge folders (at shutdown, after the engine stopped)."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    # ---- building and eviction ------------------------------------------------------------------------------
    async def _build(self, name: str, sources, field: str, write) -> None:
        try:
            paths = self.engine.adapters()
            missing = [i for i, _ in sources if i not in paths]
            if missing:
                raise UnknownAdapterError(f"adapter {missing[0]!r} is not loaded")
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="lorakit-merged-"))
                weakref.finalize(self, shutil.rmtree, self._root, True)  # also without close(): at exit or GC
            folder = self._root / f"merge-{next(self._ids)}"
            if write is None:
                folders = [paths[i] for i, _ in sources]
                await asyncio.to_thread(self._write, folders, [w for _, w in sources], folder, field)
            else:
                await asyncio.to_thread(self._write_with, write, folder)
            try:
                await self.engine.load_adapter(name, str(folder))
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            entry = _Entry(name, sources, folder)
            gone = [i for i, _ in sources if i not in self.engine.adapters()]
            if gone:  # a source was unloaded while this merge was being built
                await self._unregister(entry)
                raise UnknownAdapterError(f"adapter {gone[0]!r} was unloaded while the merge was being built")
            self._entries[name] = entry
            self.builds += 1
            log.info("merged adapter %s built (%s)", name, folder)
            await self._trim()
        finally:
            self._building.pop(name, None)

    def _write(self, folders: list[str], weights: list[float], folder: Path, field: str) -> None:
        ranks = merged_ranks(folders)
        if self.max_rank is not None and ranks and max(ranks.values()) > self.max_rank:
            path, rank = max(ranks.items(), key=lambda kv: kv[1])
            raise RequestError(f"the merged adapter would have rank {rank} on {path} (the sum of the adapters' "
                               f"ranks), more than this server's max LoRA rank {self.max_rank} (--max-lora-rank)",
                               field=field)
        merge = self._merge
        if merge is None:
            from ..compose.merge import merge_folders as merge
        self._write_with(lambda out: merge(folders, weights, out, method="cat"), folder)

    @staticmethod
    def _write_with(write, folder: Path) -> None:
        try:
            write(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def _trim(self) -> None:
        """Evict least recently used merges no request holds until at most `max_entries` remain."""
        while len(self._entries) > self.max_entries:
            victim = next((e for n, e in self._entries.items() if not self._users[n]), None)
            if victim is None:
                return  # all held: trimmed when they are released
            self._entries.pop(victim.name)
            self.evictions += 1
            log.info("merged adapter %s evicted (cache bound %d)", victim.name, self.max_entries)
            await self._unregister(victim)

    async def _unregister(self, entry: _Entry) -> None:
        try:
            await self.engine.unload_adapter(entry.name)
        except UnknownAdapterError:
            pass
        except Exception as e:  # e.g. the engine is stopping: its folder goes with the root at close()
            log.warning("could not unload merged adapter %s: %s", entry.name, e)
            return
        if self._users[entry.name]:
            self._retired[entry.name] = entry
        else:
            self._delete(entry)

    def _delete(self, entry: _Entry) -> None:
        shutil.rmtree(entry.folder, ignore_errors=True)

    def _release(self, name: str) -> None:
        self._users[name] -= 1
        if self._users[name] > 0:
            return
        del self._users[name]
        entry = self._retired.pop(name, None)
        if entry is not None:
            self._delete(entry)
        if len(self._entries) > self.max_entries and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._trim()))
