"""AsyncEngine: one background thread drives the sync Engine; asyncio code talks to it through commands.

The thread is the only caller of the Engine (add/abort/register/unregister/step/metrics). Commands go through a
queue guarded by a condition; the thread runs `engine.step()` while the engine has work and sleeps when idle.
Each request's outputs are handed to the asyncio loop that asked for it with `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any

from ..errors import (CapacityError, EngineStoppedError, QueueFullError, RequestError, ServeError,
                      UnknownAdapterError)
from .request import Request, RequestOutput

log = logging.getLogger(__name__)

_REJECTS = ((QueueFullError, "queue_full"), (UnknownAdapterError, "unknown_adapter"), (CapacityError, "capacity"),
            (RequestError, "invalid"), (EngineStoppedError, "stopped"))
_METRICS_EVERY_S = 0.1  # refresh the engine metrics snapshot at most this often while busy
_RATE_WINDOW_S = 10.0   # tokens/s gauge: generated tokens over this trailing window


class RequestStream:
    """Async iterator over one request's RequestOutputs; ends after the finished one.

    Closing it (or cancelling the task iterating it) before the end aborts the request so its KV blocks are freed.
    For logs and metrics it records `adapter`, `prompt_tokens`, `generated` (tokens so far), `created` and
    `first_token_at` (time.monotonic(); None until a token came).
    """

    def __init__(self, owner: "AsyncEngine", request_id: str, queue: asyncio.Queue, request: Request | None = None):
        self._owner, self.request_id, self._queue = owner, request_id, queue
        self.done = False
        self.adapter = getattr(request, "adapter", None)
        self.prompt_tokens = len(getattr(request, "prompt_ids", ()))
        self.generated = 0
        self.created, self.first_token_at = time.monotonic(), None

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:  # cancelled (client went away) or the loop is closing
            self._abort()
            raise
        if out.new_token_ids:
            self.generated += len(out.new_token_ids)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        if out.finished:
            self.done = True
        return out

    @property
    def ttft(self) -> float | None:
        """Seconds from the request's admission call to its first token (None before it)."""
        return None if self.first_token_at is None else self.first_token_at - self.created

    async def aclose(self) -> None:
        self._abort()

    def _abort(self) -> None:
        if not self.done:
            self.done = True
            self._owner._abort_quietly(self.request_id)

    def __del__(self):  # a stream dropped without aclose (e.g. a generator never finalised) still frees its request
        if not getattr(self, "done", True):
            self._abort()


class AsyncEngine:
    """Wraps a sync Engine for asyncio servers (see the module docstring).

    `generate(request)` is awaited to get a RequestStream: errors of `add_request` (RequestError,
    UnknownAdapterError, QueueFullError, CapacityError, EngineStoppedError) are raised there, before streaming.
    An exception inside `engine.step()` fails the requests in flight with finish_reason "error"; the thread keeps
    serving.
    """

    def __init__(self, engine, *, idle_wakeup_s: float = 0.5):
        self.engine = engine
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.eos_token_id: int | None = engine.eos_token_id
        self.model_dir: str | None = getattr(engine, "model_dir", None)
        self._idle_wakeup_s = idle_wakeup_s
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # thread-owned
        self._stopping = False  # no new requests or adapter commands
        self._stopped = False   # the thread has ended
        self._busy = False
        self._adapters: dict[str, str] = dict(engine.adapters())
        self._engine_metrics: dict[str, float] = {}
        self._history: collections.deque = collections.deque()  # (time, generation_tokens_total)
        self._counts: collections.Counter = collections.Counter()
        self._refreshed = 0.0
        self._refresh_metrics(force=True)
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- asyncio side
    async def generate(self, request: Request) -> RequestStream:
        """Queue `request`; returns the stream of its outputs. Raises the engine's admission errors."""
        if self._stopping:
            self._counts["rejected_stopped"] += 1
            raise EngineStoppedError("the server is shutting down; not taking new requests")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(self, request.request_id, queue, request)
        future = self._submit("add", request, (loop, queue))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the caller left while the command was queued: undo the add
            self._abort_quietly(request.request_id)
            stream.done = True
            raise
        except BaseException:
            stream.done = True  # refused: nothing to abort
            raise
        return stream

    async def load_adapter(self, name: str, path: str) -> None:
        """Register an adapter (validated by the engine; tensors are read lazily)."""
        self._check_running()
        await asyncio.wrap_future(self._submit("register", (name, path)))

    async def unload_adapter(self, name: str) -> None:
        """Unregister an adapter; requests already admitted for it finish first (engine semantics)."""
        self._check_running()
        await asyncio.wrap_future(self._submit("unregister", name))

    def adapters(self) -> dict[str, str]:
        """name -> path of the registered adapters (a snapshot kept by the engine thread)."""
        return dict(self._adapters)

    def metrics(self) -> dict[str, float]:
        """The engine's metrics (a snapshot at most ~0.1 s old) plus the wrapper's own counters.

        Adds `generation_tokens_per_s` (trailing 10 s window), `requests_<reason>_total` per finish reason,
        `rejected_<kind>_total` per refused request kind, `step_errors_total`, `in_flight`.
        """
        m = dict(self._engine_metrics)
        hist = list(self._history)
        if len(hist) >= 2 and hist[-1][0] > hist[0][0]:
            m["generation_tokens_per_s"] = (hist[-1][1] - hist[0][1]) / (hist[-1][0] - hist[0][0])
        else:
            m["generation_tokens_per_s"] = 0.0
        for key, value in list(self._counts.items()):
            m[f"{key}_total"] = m.get(f"{key}_total", 0.0) + float(value)
        m["in_flight"] = float(len(self._streams))
        return m

    @property
    def healthy(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `timeout` s, abort the rest, stop the thread."""
        with self._cond:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.01)
        if self._thread.is_alive():
            try:
                await asyncio.wait_for(asyncio.wrap_future(self._submit("abort_all", None, force=True)), 5.0)
            except (asyncio.TimeoutError, EngineStoppedError):
                pass
            try:
                self._submit("stop", None, force=True)
            except EngineStoppedError:
                pass
            await asyncio.to_thread(self._thread.join, 10.0)

    # ---------------------------------------------------------------- commands
    def _check_running(self) -> None:
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")

    def _submit(self, kind: str, arg: Any, target=None, force: bool = False) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopped or (self._stopping and not force and kind not in ("abort",)):
                raise EngineStoppedError("the engine has stopped" if self._stopped else "the server is shutting down")
            self._commands.append((kind, arg, target, future))
            self._cond.notify()
        return future

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self._submit("abort", request_id)
        except EngineStoppedError:
            pass

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        errors_in_a_row = 0
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._busy:
                        if not self._cond.wait(self._idle_wakeup_s):
                            self._refresh_metrics(force=True)  # so an idle server's tokens/s decays to 0
                    commands = list(self._commands)
                    self._commands.clear()
                stop = False
                for command in commands:
                    stop = self._execute(*command) or stop
                if stop:
                    break
                try:
                    self._busy = bool(self.engine.has_work())
                    if self._busy:
                        progressed = self._step()
                        errors_in_a_row = 0 if progressed is not None else errors_in_a_row + 1
                        if progressed is None:  # step raised: back off a little if it keeps raising
                            time.sleep(min(0.01 * errors_in_a_row, 0.5))
                        elif not progressed:  # waiting on something (e.g. a cold adapter loading): do not spin
                            with self._cond:
                                if not self._commands:
                                    self._cond.wait(0.002)
                    self._refresh_metrics(force=not self._busy)
                except Exception:  # has_work/metrics raising must not kill the thread either
                    log.exception("engine thread: unexpected error")
                    self._busy = False
                    time.sleep(0.01)
        finally:
            with self._cond:
                self._stopped = True
                left = list(self._commands)
                self._commands.clear()
            for _, _, _, future in left:
                if not future.done():
                    future.set_exception(EngineStoppedError("the engine has stopped"))
            for request_id in list(self._streams):
                self._deliver(RequestOutput(request_id, (), "abort", "the engine stopped"))
            close = getattr(self.engine, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("engine.close() failed")

    def _execute(self, kind: str, arg, target, future: concurrent.futures.Future) -> bool:
        """Run one command on the engine thread; returns True for "stop"."""
        try:
            if kind == "add":
                if self._stopping:
                    raise EngineStoppedError("the server is shutting down; not taking new requests")
                self.engine.add_request(arg)
                self._streams[arg.request_id] = target
                self._counts["requests_accepted"] += 1
            elif kind == "abort":
                if self._streams.pop(arg, None) is not None:
                    self._counts["requests_abort"] += 1
                    self.engine.abort(arg)
            elif kind == "abort_all":
                for request_id in list(self._streams):
                    try:
                        self.engine.abort(request_id)
                    except Exception:
                        log.exception("abort of %s failed", request_id)
                    self._deliver(RequestOutput(request_id, (), "abort", "the server is shutting down"))
            elif kind == "register":
                self.engine.register_adapter(*arg)
                self._adapters = dict(self.engine.adapters())
            elif kind == "unregister":
                self.engine.unregister_adapter(arg)
                self._adapters = dict(self.engine.adapters())
            elif kind == "stop":
                future.set_result(None)
                return True
            else:
                raise ValueError(f"unknown command {kind!r}")
        except Exception as e:
            if kind == "add":
                reject = next((name for cls, name in _REJECTS if isinstance(e, cls)), "error")
                self._counts[f"rejected_{reject}"] += 1
            elif kind == "abort" and not isinstance(e, ServeError):
                log.exception("abort of %s failed", arg)
            future.set_exception(e)
            return False
        future.set_result(None)
        return False

    def _step(self) -> bool | None:
        """One engine step; returns whether any request advanced, or None when the step raised."""
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine.step() failed; failing the requests in flight")
            self._counts["step_errors"] += 1
            message = f"engine step failed: {type(e).__name__}: {e}"
            for request_id in list(self._streams):
                try:
                    self.engine.abort(request_id)
                except Exception:
                    pass
                self._deliver(RequestOutput(request_id, (), "error", message))
            return None
        if any(out.finished for out in outputs):  # a client that got its response sees it in the metrics
            self._refresh_metrics(force=True)
        for out in outputs:
            self._deliver(out)
        return bool(outputs)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:  # aborted by its consumer, or not ours
            return
        if out.finished:
            del self._streams[out.request_id]
            self._counts[f"requests_{out.finish_reason}"] += 1
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # that event loop is closed: nobody is listening
            if not out.finished:
                self._streams.pop(out.request_id, None)
                try:
                    self.engine.abort(out.request_id)
                except Exception:
                    pass

    def _refresh_metrics(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed < _METRICS_EVERY_S:
            return
        self._refreshed = now
        try:
            m = {k: float(v) for k, v in self.engine.metrics().items()}
        except Exception:
            log.exception("engine.metrics() failed")
            return
        self._engine_metrics = m
        self._history.append((now, m.get("generation_tokens_total", 0.0)))
        while len(self._history) > 2 and now - self._history[1][0] >= _RATE_WINDOW_S:
            self._history.popleft()
