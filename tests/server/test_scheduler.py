"""The scheduler with fake executors (no model): FIFO order, deltas merged for a slow
reader, cancellation of waiting and running sequences, one failed sequence among others,
a full queue, and a dead worker."""

from __future__ import annotations

import asyncio
import threading

import pytest

from retrieval_attn.sampling import SamplingParams
from retrieval_attn.server.scheduler import (
    QueueFull,
    RequestStream,
    Scheduler,
    Sequence,
    StepOutput,
)


class CountingExecutor:
    """Each sequence yields its prompt's tokens as text, one a step; fails on token 0."""

    max_running = 1

    def __init__(self) -> None:
        self.started: list[str] = []
        self.freed: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def step(self, running):
        self.gate.wait(10)
        out = []
        for seq in running:
            if seq.state is None:
                self.started.append(seq.request_id)
                seq.state = 0
            if seq.prompt_ids[seq.state] == 0:
                out.append(StepOutput(None, "", error="token 0 breaks this engine"))
                continue
            token = seq.prompt_ids[seq.state]
            seq.state += 1
            done = seq.state == len(seq.prompt_ids)
            out.append(StepOutput(token, str(token), "length" if done else None))
        return out

    def free(self, seq) -> None:
        self.freed.append(seq.request_id)


async def _read(seq: Sequence):
    text = ""
    while True:
        d = await seq.stream.get()
        text += d.text
        if d.finished:
            return text, d.finish_reason, d.error


def _seq(name: str, ids: list[int]) -> Sequence:
    return Sequence(name, ids, SamplingParams(), RequestStream(asyncio.get_running_loop()))


def test_fifo_merged_deltas_and_a_failed_sequence():
    ex = CountingExecutor()
    sched = Scheduler(ex, max_waiting=8)

    async def main():
        seqs = [_seq("a", [1, 2, 3]), _seq("bad", [4, 0]), _seq("c", [5, 6])]
        for s in seqs:
            sched.submit(s)
        sched.start()
        await asyncio.sleep(0.2)  # let every output pile up: the reader gets one merged delta
        out = [await _read(s) for s in seqs]
        assert sched.alive  # one failed sequence does not stop the worker
        return out

    try:
        got = asyncio.run(main())
    finally:
        sched.stop()
    assert got[0] == ("123", "length", None) and got[2] == ("56", "length", None)
    assert got[1][0] == "4" and got[1][2] == "token 0 breaks this engine"
    assert ex.started == ["a", "bad", "c"] and sorted(ex.freed) == ["a", "bad", "c"]
    assert sched.num_running == sched.num_waiting == 0


def test_cancelled_sequences_are_freed_and_a_full_queue_refuses():
    ex = CountingExecutor()
    ex.gate.clear()
    sched = Scheduler(ex, max_waiting=1)

    async def main():
        running, waiting = _seq("run", [1] * 100), _seq("wait", [2])
        sched.submit(running)
        sched.start()
        while sched.num_running == 0:
            await asyncio.sleep(0.01)
        sched.submit(waiting)
        with pytest.raises(QueueFull, match="max-waiting is 1"):
            sched.submit(_seq("over", [3]))
        sched.abort(waiting)
        sched.abort(running)
        ex.gate.set()
        return await _read(waiting), await _read(running)

    try:
        (w, r) = asyncio.run(main())
    finally:
        sched.stop()
    assert w[1] == r[1] == "cancelled"
    assert sched.num_running == sched.num_waiting == 0
    assert "run" in ex.freed and "wait" not in ex.started


def test_a_broken_engine_ends_the_worker_and_fails_its_requests():
    class Broken(CountingExecutor):
        def step(self, running):
            raise RuntimeError("CUDA error: device lost")

    sched = Scheduler(Broken(), max_waiting=4)

    async def main():
        seq = _seq("x", [1])
        sched.submit(seq)
        sched.start()
        return await _read(seq)

    text, reason, error = asyncio.run(main())
    sched.stop()
    assert error and not sched.alive and isinstance(sched.error, RuntimeError)
