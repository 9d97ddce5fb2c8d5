"""IndexBuildService: builds each layer's host indexes off the decode path.

builder "ray": one Ray task per (layer, group of kv heads) on a local Ray (ray.init())
or an existing cluster (index.ray_address). A worker that dies mid-build is replaced and
its task retried by Ray (max_retries); a task that still fails leaves its layer on the
low-rank retriever, logged, never without a retriever. builder "threads": a pool of host
threads in this process (machines without Ray): the layer's prefill goes on while its
index builds, since the C++ and numpy parts release the GIL. builder "inline": the build
runs in the calling process when the layer is submitted (small runs, tests).

Results come back as plain arrays (index states), never pickled objects, and are turned
into index objects over the host store's own key rows by the caller.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from retrieval_attn.errors import ConfigError
from retrieval_attn.index.ann_retriever import build_layer_states, require_index_modules

LOG = logging.getLogger(__name__)


@dataclass
class BuiltLayer:
    layer: int
    states: list[dict[str, np.ndarray]]  # one per kv head
    seconds: float  # submit -> ready


class IndexBuildService:
    def __init__(self, kind: str, builder: str, ray_address: str | None = None,
                 heads_per_task: int = 0, max_retries: int = 3, progress: bool = False) -> None:
        self.kind, self.builder = kind, builder
        self.heads_per_task, self.progress = heads_per_task, progress
        self._ready: list[BuiltLayer] = []
        self._tasks: dict = {}  # ray ObjectRef -> (layer, first head, submit time)
        self._parts: dict[int, dict[int, list]] = {}  # layer -> first head -> states
        self._heads: dict[int, int] = {}  # layer -> kv heads
        self._bar: tqdm | None = None
        self.failed: list[int] = []
        self._futures: dict[Future, tuple[int, float]] = {}  # threads: -> (layer, submit time)
        require_index_modules(kind)  # now, as Ray below: not when prefill's first layer ends
        if builder == "ray":
            self._remote = _ray_task(ray_address, max_retries)
        elif builder == "threads":
            self._pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2),
                                            thread_name_prefix="index-build")

    @property
    def pending(self) -> int:
        """Layers submitted and not yet handed back."""
        return len(self._heads) + len(self._futures)

    def submit(self, layer: int, keys: np.ndarray, queries: np.ndarray) -> None:
        """keys [Hkv, n, D], queries [Hkv, M, D] float32 of one layer."""
        t0 = time.perf_counter()
        if self.builder == "inline":
            self._ready.append(BuiltLayer(layer, build_layer_states(self.kind, keys, queries),
                                          time.perf_counter() - t0))
            return
        if self.builder == "threads":  # keys, queries are the caller's copies, not views
            fut = self._pool.submit(build_layer_states, self.kind, keys, queries)
            self._futures[fut] = (layer, t0)
            return
        import ray

        hkv = keys.shape[0]
        step = self.heads_per_task or hkv
        self._heads[layer], self._parts[layer] = hkv, {}
        for h in range(0, hkv, step):
            ref = self._remote.remote(self.kind, ray.put(keys[h:h + step]),
                                      ray.put(queries[h:h + step]))
            self._tasks[ref] = (layer, h, t0)
        if self._bar is None and self.progress:
            self._bar = tqdm(total=0, unit="layer", desc="index build", leave=False)
        if self._bar is not None:
            self._bar.total += 1
            self._bar.refresh()

    def collect(self, wait: bool = False) -> list[BuiltLayer]:
        """Layers whose every kv head is built, since the last call. wait: block until
        nothing is pending."""
        for fut in [f for f in self._futures if wait or f.done()]:
            layer, t0 = self._futures.pop(fut)
            try:
                self._ready.append(BuiltLayer(layer, fut.result(), time.perf_counter() - t0))
            except Exception as e:  # a failed build leaves the layer on the low-rank path
                LOG.error("index build of layer %d failed (%s); the layer stays on the "
                          "low-rank retriever", layer, str(e).splitlines()[0])
                self.failed.append(layer)
        if self._tasks:
            import ray

            refs = list(self._tasks)
            done, _ = ray.wait(refs, num_returns=len(refs) if wait else 1,
                               timeout=None if wait else 0)
            if not wait and done:  # more may be ready: take all of them without blocking
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                self._take(ref)
        ready, self._ready = self._ready, []
        return ready

    def _take(self, ref) -> None:
        import ray

        layer, head, t0 = self._tasks.pop(ref)
        try:
            self._parts[layer][head] = ray.get(ref)
        except Exception as e:  # retries exhausted: the layer stays on the low-rank path
            LOG.error("index build of layer %d failed (%s); the layer stays on the "
                      "low-rank retriever", layer, str(e).splitlines()[0])
            self._parts[layer][head] = None
        parts = self._parts[layer]
        if not _complete(parts, self._heads[layer], self.heads_per_task):
            return
        del self._heads[layer], self._parts[layer]
        if self._bar is not None:
            self._bar.update(1)
            if not self._heads:
                self._bar.close()
                self._bar = None
        if any(p is None for p in parts.values()):
            self.failed.append(layer)
            return
        states = [s for h in sorted(parts) for s in parts[h]]
        self._ready.append(BuiltLayer(layer, states, time.perf_counter() - t0))

    def cancel(self) -> None:
        """Drop every pending build (a new prompt replaces the context)."""
        if self._tasks:
            import ray

            for ref in self._tasks:
                ray.cancel(ref, force=True)
        self._tasks.clear()
        for fut in self._futures:  # queued builds never start; running ones are ignored
            fut.cancel()
        self._futures.clear()
        self._parts.clear()
        self._heads.clear()
        self._ready.clear()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _complete(parts: dict[int, list | None], heads: int, per_task: int) -> bool:
    step = per_task or heads
    return len(parts) == -(-heads // step)


def _ray_task(address: str | None, max_retries: int):
    try:
        import ray
    except ImportError:
        raise ConfigError("index.builder is ray but Ray is not installed: pip install ray, "
                          "or set index.builder: inline") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except Exception as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise ConfigError(f"could not start {where} ({e}): check index.ray_address, "
                              "or set index.builder: inline") from None
    # Worker death (a killed process, a lost node) is retried by Ray; exceptions raised by
    # the build itself are bugs and are not retried.
    return ray.remote(num_cpus=1, max_retries=max_retries)(build_layer_states)
