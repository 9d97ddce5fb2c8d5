"""HostIndexFeed: the host ANN index side of SparseKV (index.kind other than lowrank).

During prefill a sample of each layer's queries is kept on the host; when a layer's prefill
is done its offloaded keys and those queries go to the IndexBuildService, and built
indexes are installed between decode steps (until then the layer is served by the
low-rank retriever). The last PROBE_QUERIES prompt positions' queries are held out of the
builds and kept for inspection. SparseKV holds the state (ann, builder, window, store,
cfg and the query buffers); this class is its methods on it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from retrieval_attn.index.ann_retriever import LayerIndex
from retrieval_attn.offload.policy import AttnStep

LOG = logging.getLogger(__name__)
PROBE_QUERIES = 32  # last prompt positions held out of index builds, kept for inspection


class HostIndexFeed:
    """Mixed into SparseKV: feeds its host indexes (module docstring)."""

    def _reset_index(self, n: int) -> None:
        """Drop the previous prompt's indexes and pending builds; sample n's queries."""
        self.builder.cancel()
        self.ann.reset()
        self._queries.clear()
        self.build_queries.clear()
        self.probe_queries.clear()
        self.prompt_tokens = n
        self.query_stride = max(1, n // self.index_cfg.build_queries)

    def _keep_queries(self, layer: int, q: torch.Tensor, step: AttnStep) -> None:
        """q [1, H, T, D]: keep every query_stride-th prefill query for the index build,
        and the last PROBE_QUERIES positions' queries, held out, for inspection."""
        pos, probe_from = step.positions, self.prompt_tokens - PROBE_QUERIES
        keep = ((pos % self.query_stride == 0) & (pos < probe_from)).nonzero()[:, 0]
        self._queries.setdefault(layer, []).append(q[0][:, keep].float().cpu())
        held = (pos >= probe_from).nonzero()[:, 0]
        if held.numel():
            self.probe_queries.setdefault(layer, []).append(q[0][:, held].float().cpu())

    def saved_queries(self) -> dict[str, np.ndarray]:
        """Build and probe queries of every layer, as save_context writes them (float16:
        they are for inspection and rebuilds, and would otherwise outweigh small KVs)."""
        out = {f"build.{layer}": q.astype(np.float16) for layer, q in self.build_queries.items()}
        for layer, parts in self.probe_queries.items():
            out[f"probe.{layer}"] = torch.cat(parts, dim=1).half().numpy()  # [H, P, D]
        return out

    def _index_range(self, n: int) -> tuple[int, int]:
        """Positions a layer's index covers: the offloaded region at the first decode step
        [sinks, n + 1 - W). Later tokens leave the window into the exact-scan buffer."""
        lo = self.cfg.sink_tokens
        return lo, max(lo, n + 1 - self.window.W)

    def _submit_build(self, layer: int, n: int) -> None:
        lo, hi = self._index_range(n)
        queries = self._queries.pop(layer, [])
        if hi - lo < 1 or not queries:
            return
        q = torch.cat(queries, dim=1)  # [H, M, D]
        q = q.reshape(self.Hkv, -1, self.D).numpy()  # [Hkv, G·M, D]: the group's queries
        self.build_queries[layer] = q
        self.builder.submit(layer, self._index_keys(layer, lo, hi), q)

    def install_ready(self, wait: bool = False) -> list[int]:
        """Install the layers whose index builds are done -> their layer numbers."""
        (lo, hi), done = self._index_range(self.prompt_tokens), []
        for built in self.builder.collect(wait=wait):
            keys = list(self._index_keys(built.layer, lo, hi))
            self.ann.install(built.layer, LayerIndex.from_states(self.ann.kind, lo,
                                                                 built.states, keys))
            done.append(built.layer)
            LOG.info("layer %d: %s index ready after %.2f s; switching from the low-rank "
                     "retriever", built.layer, self.ann.kind, built.seconds)
        return done

    def _index_keys(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """Keys [Hkv, hi - lo, D] float32: a view of the store when it is float32."""
        return self.store.read(layer, lo, hi)[0].float().numpy()
