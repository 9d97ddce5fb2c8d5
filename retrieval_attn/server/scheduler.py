"""Scheduler: a bounded queue of requests in front of one engine worker thread.

Async request handlers submit a Sequence and read its outputs from a RequestStream; the
worker thread owns the engine. Each loop turn is schedule (admit waiting sequences while
the executor has room, drop cancelled ones) -> executor.step (one new token for every
running sequence) -> postprocess (deliver, finish, free). With LLMExecutor one sequence
runs at a time (FIFO); an executor that decodes a ragged batch raises max_running and the
loop stays as it is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from retrieval_attn.errors import RetrievalAttnError
from retrieval_attn.sampling import SamplingParams

LOG = logging.getLogger(__name__)


class QueueFull(RetrievalAttnError):
    """Every waiting slot is taken: the client should retry later (HTTP 429)."""


@dataclass
class Delta:
    """What a request produced since its reader last looked (merged while it lags)."""

    text: str = ""
    new_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" or "length"
    error: str | None = None  # the engine failed this request (the server carries on)


class RequestStream:
    """One request's outputs: written by the worker thread, read by one async task.
    Outputs the reader has not taken yet merge into one Delta, so memory stays bounded by
    the request's text however slow the reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: Delta | None = None
        self._ready = asyncio.Event()

    def put(self, text: str, new_tokens: int, finish_reason: str | None = None,
            error: str | None = None) -> None:
        with self._lock:
            d = self._pending or Delta()
            d.text += text
            d.new_tokens += new_tokens
            if finish_reason is not None or error is not None:
                d.finished, d.finish_reason, d.error = True, finish_reason, error
            self._pending = d
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> Delta:
        await self._ready.wait()
        with self._lock:
            d, self._pending = self._pending, None
            self._ready.clear()
        return d or Delta()


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """All per-request state the scheduler and executor share."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    context: Any = None  # a shared context the prompt continues (server/contexts.py)
    status: str = "waiting"  # waiting -> running -> finished
    cancelled: bool = False  # set by any thread; acted on by the worker at its next turn
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    new_tokens: int = 0
    outcome: str | None = None  # "stop", "length", "cancelled", "error"
    state: Any = None  # the executor's own (LLMExecutor: the token generator)
    serial: int = field(default_factory=lambda: next(_ids))


@dataclass
class StepOutput:
    token: int | None  # None: no new token (text flushed at the end, or an EOS)
    text: str
    finish_reason: str | None = None  # set when the sequence is done
    error: str | None = None  # the engine failed this sequence alone (it is dropped)


class Executor(Protocol):
    """The engine side the scheduler drives (tests may fake it)."""

    max_running: int  # sequences it can hold at once

    def step(self, running: list[Sequence]) -> list[StepOutput]:
        """Advance every running sequence by one token (a sequence's first step prefills
        it); one output per sequence, in order."""
        ...

    def free(self, seq: Sequence) -> None:
        """Release what the sequence holds (finished, cancelled or failed)."""
        ...


class Observer(Protocol):
    """Metrics hooks, called on the worker thread."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, seq: Sequence) -> None: ...


class Scheduler:
    def __init__(self, executor: Executor, max_waiting: int,
                 observer: Observer | None = None) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting is {max_waiting}: it must be at least 1")
        self.executor, self.max_waiting, self.observer = executor, max_waiting, observer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what ended the worker, if anything

    # ----- any thread -----

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the "
                                f"server's --max-waiting is {self.max_waiting}): retry later")
            self.waiting.append(seq)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the worker thread once no sequence is running (engine work outside
        a request: prefilling a shared context); its result or error lands in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self.calls.append((fn, fut))
            self._cv.notify()
        return fut

    def abort(self, seq: Sequence) -> None:
        """Cancel a request (its client left): it is freed at the worker's next turn."""
        with self._cv:
            if seq.status != "finished":
                seq.cancelled = True
                self._cv.notify()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----- the worker thread -----

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stop or self.waiting or self.running or self.calls):
                        self._cv.wait()
                    if self._stop:
                        break
                    call = self.calls.popleft() if self.calls and not self.running else None
                    if call is None:
                        self._schedule()
                if call is not None:
                    _run_call(*call)
                elif self.running:
                    self._postprocess(self.executor.step(self.running))
        except Exception as e:  # noqa: BLE001 - the engine is broken: /health turns 503
            LOG.exception("the engine worker stopped")
            self.error = e
        finally:
            for seq in list(self.waiting) + self.running:
                self._finish(seq, "error", "the server is shutting down")
            for _, fut in self.calls:
                fut.cancel()

    def _schedule(self) -> None:
        """(lock held) Drop cancelled sequences; admit waiting ones while there is room."""
        for seq in [s for s in self.running if s.cancelled]:
            self.running.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        while self.waiting and len(self.running) < self.executor.max_running:
            seq = self.waiting.popleft()
            seq.status = "running"
            self.running.append(seq)

    def _postprocess(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        for seq, out in zip(list(self.running), outputs, strict=True):
            if out.token is not None:
                seq.new_tokens += 1
                if self.observer is not None:
                    if seq.first_token_at is None:
                        self.observer.first_token(now - seq.arrival)
                    else:
                        self.observer.inter_token(now - seq.last_token_at)
                seq.first_token_at = seq.first_token_at or now
                seq.last_token_at = now
            if out.error is not None:
                with self._cv:
                    self.running.remove(seq)
                self._finish(seq, "error", out.error)
                continue
            if out.finish_reason is None:
                seq.stream.put(out.text, int(out.token is not None))
                continue
            seq.stream.put(out.text, int(out.token is not None), out.finish_reason)
            with self._cv:
                self.running.remove(seq)
            self._finish(seq, out.finish_reason, stream_done=True)

    def _finish(self, seq: Sequence, outcome: str, error: str | None = None,
                stream_done: bool = False) -> None:
        if seq.status == "finished":
            return
        seq.status, seq.outcome = "finished", outcome
        try:
            self.executor.free(seq)
        except Exception:  # noqa: BLE001 - freeing must not stop the other requests
            LOG.exception("freeing request %s failed", seq.request_id)
        if not stream_done:
            if outcome == "cancelled":
                seq.stream.put("", 0, "cancelled")
            else:
                seq.stream.put("", 0, None, error or "the request failed")
        if self.observer is not None:
            self.observer.finished(seq)
        log_request(seq)


def _run_call(fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except Exception as e:  # noqa: BLE001 - handed to the caller
        fut.set_exception(e)


def log_request(seq: Sequence, log: Callable[..., None] = LOG.info) -> None:
    """One line per request: id, outcome, tokens, time to first token, decode speed."""
    ttft = (seq.first_token_at - seq.arrival) if seq.first_token_at else None
    span = (seq.last_token_at - seq.first_token_at) if seq.first_token_at else 0.0
    speed = (seq.new_tokens - 1) / span if span > 0 else 0.0
    log("%s %s: prompt %d tokens, %d new, TTFT %s, %.1f tok/s", seq.request_id, seq.outcome,
        len(seq.prompt_ids), seq.new_tokens,
        f"{ttft * 1e3:.0f} ms" if ttft is not None else "-", speed)
