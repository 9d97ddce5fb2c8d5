"""HostIndexFeed: feeds a SparseKV's host ANN indexes (index.kind other than lowrank).

During prefill a sample of each layer's queries is kept on the host; when a layer's prefill
is done its offloaded keys and those queries go to the IndexBuildService, and built
indexes are installed into the AnnRetriever between decode steps (until then the layer is
served by the low-rank retriever). The last PROBE_QUERIES prompt positions' queries are
held out of the builds and kept for inspection.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from retrieval_attn.config import IndexConfig
from retrieval_attn.index.ann_retriever import AnnRetriever, LayerIndex
from retrieval_attn.index.build_service import IndexBuildService
from retrieval_attn.offload.kv_store import KVStore
from retrieval_attn.offload.policy import AttnStep

LOG = logging.getLogger(__name__)
PROBE_QUERIES = 32  # last prompt positions held out of index builds, kept for inspection


class HostIndexFeed:
    """The index builds of one policy: its AnnRetriever's indexes are built from the
    store's keys [sinks, n + 1 - window) and the kept prefill queries."""

    def __init__(self, cfg: IndexConfig, ann: AnnRetriever, store: KVStore,
                 num_kv_heads: int, head_dim: int, sink_tokens: int, window_tokens: int,
                 progress: bool = False) -> None:
        self.cfg, self.ann, self.store = cfg, ann, store
        self.Hkv, self.D = num_kv_heads, head_dim
        self.sink_tokens, self.window_tokens = sink_tokens, window_tokens
        self.builder = IndexBuildService(cfg.kind, cfg.builder, cfg.ray_address,
                                         progress=progress)
        self._queries: dict[int, list[torch.Tensor]] = {}  # layer -> [H, m, D] host chunks
        self.build_queries: dict[int, np.ndarray] = {}  # layer -> [Hkv, G·M, D]
        self.probe_queries: dict[int, list[torch.Tensor]] = {}  # layer -> [H, p, D] chunks
        self.query_stride = 1
        # the prompt's length: start_request's (or the capacity) until the prefill knows it
        self.prompt_tokens = 0

    @property
    def pending(self) -> int:
        """Builds submitted and not installed yet."""
        return self.builder.pending

    def reset(self, n: int) -> None:
        """Drop the previous prompt's indexes and pending builds; sample n's queries."""
        self.builder.cancel()
        self.ann.reset()
        self._queries.clear()
        self.build_queries.clear()
        self.probe_queries.clear()
        self.prompt_tokens = n
        self.query_stride = max(1, n // self.cfg.build_queries)

    def begin(self, n: int) -> None:
        """The prompt's length is known: n tokens."""
        self.prompt_tokens = n

    def keep_queries(self, layer: int, q: torch.Tensor, step: AttnStep) -> None:
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
        they are for inspection and rebuilds, and would otherwise outweigh small KVs):
        "build.{layer}" [Hkv, G·M, D], "probe.{layer}" [H, P, D]."""
        out = {f"build.{layer}": q.astype(np.float16) for layer, q in self.build_queries.items()}
        for layer, parts in self.probe_queries.items():
            out[f"probe.{layer}"] = torch.cat(parts, dim=1).half().numpy()  # [H, P, D]
        return out

    def load_queries(self, saved: dict[str, np.ndarray]) -> None:
        """saved_queries' arrays, back (as float32)."""
        for name, q in saved.items():
            part, layer = name.split(".")
            if part == "build":
                self.build_queries[int(layer)] = q.astype(np.float32)
            else:
                self.probe_queries[int(layer)] = [torch.from_numpy(q).float()]

    def index_range(self, n: int) -> tuple[int, int]:
        """Positions a layer's index covers: the offloaded region at the first decode step
        [sinks, n + 1 - W). Later tokens leave the window into the exact-scan buffer."""
        lo = self.sink_tokens
        return lo, max(lo, n + 1 - self.window_tokens)

    def submit_build(self, layer: int, n: int) -> None:
        """The layer's prefill is done for n tokens: build its index from its keys and
        kept queries (nothing to build without either)."""
        lo, hi = self.index_range(n)
        queries = self._queries.pop(layer, [])
        if hi - lo < 1 or not queries:
            return
        q = torch.cat(queries, dim=1)  # [H, M, D]
        q = q.reshape(self.Hkv, -1, self.D).numpy()  # [Hkv, G·M, D]: the group's queries
        self.build_queries[layer] = q
        self.builder.submit(layer, self.index_keys(layer, lo, hi), q)

    def install_ready(self, wait: bool = False) -> list[int]:
        """Install the layers whose index builds are done -> their layer numbers."""
        done = []
        for built in self.builder.collect(wait=wait):
            self.install(built.layer, built.states)
            done.append(built.layer)
            LOG.info("layer %d: %s index ready after %.2f s; switching from the low-rank "
                     "retriever", built.layer, self.ann.kind, built.seconds)
        return done

    def install(self, layer: int, states: list[dict[str, np.ndarray]]) -> None:
        """A layer's index from its kv heads' states (a build's, or a saved context's)
        over the prompt's keys in the store."""
        lo, hi = self.index_range(self.prompt_tokens)
        keys = list(self.index_keys(layer, lo, hi))
        self.ann.install(layer, LayerIndex.from_states(self.ann.kind, lo, states, keys))

    def index_states(self) -> dict[int, list[dict[str, np.ndarray]]]:
        """Every installed layer's index as its kv heads' state arrays (save_context)."""
        return {layer: index.states for layer, index in sorted(self.ann.layers.items())}

    def index_keys(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """Keys [Hkv, hi - lo, D] float32: a view of the store when it is float32."""
        return self.store.read(layer, lo, hi)[0].float().numpy()
