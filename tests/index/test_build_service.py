"""IndexBuildService: inline, thread and Ray builds agree, a Ray worker killed mid-build is
retried with every layer still built, and a failed thread build leaves its layer out."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval_attn.index.build_service import IndexBuildService

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def _layer(seed: int, n: int = 1200, m: int = 600, hkv: int = 2, d: int = 32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hkv, n, d)).astype(np.float32),
            (rng.standard_normal((hkv, m, d)) + 0.5).astype(np.float32))


def test_ray_builds_equal_inline_builds(local_ray):
    inline = IndexBuildService("attention", "inline")
    remote = IndexBuildService("attention", "ray", heads_per_task=1)
    for layer in range(3):
        keys, queries = _layer(layer)
        inline.submit(layer, keys, queries)
        remote.submit(layer, keys, queries)
    assert remote.pending == 3
    a = {b.layer: b.states for b in inline.collect()}
    b = {b.layer: b.states for b in remote.collect(wait=True)}
    assert remote.pending == 0 and sorted(a) == [0, 1, 2]
    assert all(len(states) == 2 for states in b.values())  # one state per kv head
    _same_states(a, b)


def _same_states(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for layer in a:
        for sa, sb in zip(a[layer], b[layer], strict=True):
            for name in ("indptr", "indices", "centroids", "entry_table"):
                np.testing.assert_array_equal(sa[name], sb[name])


def test_thread_builds_equal_inline_builds_and_run_in_the_background():
    inline = IndexBuildService("attention", "inline")
    threads = IndexBuildService("attention", "threads")
    for layer in range(3):
        keys, queries = _layer(layer)
        inline.submit(layer, keys, queries)
        threads.submit(layer, keys, queries)
    assert inline.pending == 0 and threads.pending == 3  # submit returned before the build
    b = {x.layer: x.states for x in threads.collect(wait=True)}
    assert threads.pending == 0 and threads.failed == []
    _same_states({x.layer: x.states for x in inline.collect()}, b)


def test_failed_thread_build_leaves_the_layer_to_the_low_rank_path(caplog):
    service = IndexBuildService("attention", "threads")
    keys, queries = _layer(0)
    service.submit(0, keys, queries[:, :, :7])  # queries of another dim: the build raises
    service.submit(1, keys, queries)
    built = service.collect(wait=True)
    assert [b.layer for b in built] == [1] and service.failed == [0]
    assert "index build of layer 0 failed" in caplog.text


def test_cancel_drops_pending_thread_builds():
    service = IndexBuildService("attention", "threads")
    for layer in range(4):
        service.submit(layer, *_layer(layer))
    service.cancel()
    assert service.pending == 0 and service.collect(wait=True) == []


def _busy_build_workers() -> list[int]:
    """pids of Ray workers executing a build task (Ray titles them ray::<task>)."""
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text.startswith("ray::build_layer_states"):
            pids.append(int(cmd.parent.name))
    return pids


def test_killed_worker_is_retried_and_every_layer_is_built(local_ray):
    service = IndexBuildService("attention", "ray")
    for layer in range(4):
        service.submit(layer, *_layer(layer, n=12000, m=3000))
    deadline, killed = time.time() + 60, None
    while killed is None and time.time() < deadline:
        busy = _busy_build_workers()
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    assert killed is not None, "no build task was seen running"
    built = service.collect(wait=True)
    assert sorted(b.layer for b in built) == [0, 1, 2, 3]
    assert service.failed == [] and service.pending == 0
