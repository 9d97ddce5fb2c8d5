"""AnnRetriever: decode-time top-k from host ANN indexes, one per (layer, kv head).

A layer's index covers the prompt's offloaded positions [lo, n): built once the layer's
prefill is done (inline or on Ray workers, see build_service.py). Until a layer's index
is installed the layer is served by the low-rank retriever, so decode never waits.
Tokens decoded later leave the window into positions [n, hi): they sit in a flat buffer
that every step scans exactly, until the next prompt.

Each step, for every kv head: each of the G query heads of the group searches the head's
index for its own top-k (one host thread per search, all Hkv·G at once); the union of
their candidates and the flat buffer is re-scored with the exact keys from the host
store, and the k with the largest summed attention shares (window log-sum-exp included,
as in group_scores) win.
`hybrid` adds the low-rank retriever's picks to the candidates before the re-rank.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from retrieval_attn.errors import ConfigError
from retrieval_attn.index.attention_graph import AttentionAwareIndex
from retrieval_attn.index.base import Retriever, Selection
from retrieval_attn.index.faiss_ann import FaissHNSWIndex, FaissIVFIndex
from retrieval_attn.index.hnswlib_ann import HnswlibIndex

LOG = logging.getLogger(__name__)

INDEX_CLASSES = {"attention": AttentionAwareIndex, "hybrid": AttentionAwareIndex,
                 "faiss-hnsw": FaissHNSWIndex, "faiss-ivf": FaissIVFIndex,
                 "hnswlib": HnswlibIndex}

HeadIndex = AttentionAwareIndex | FaissHNSWIndex | FaissIVFIndex | HnswlibIndex
# the libraries each kind builds and searches with (build_layer_states imports faiss for all)
INDEX_MODULES = {"attention": ("faiss",), "hybrid": ("faiss",), "faiss-hnsw": ("faiss",),
                 "faiss-ivf": ("faiss",), "hnswlib": ("faiss", "hnswlib")}
PIP_NAMES = {"faiss": "faiss-cpu (faiss-gpu where CUDA is)", "hnswlib": "hnswlib"}


def missing_modules(kinds: list[str]) -> list[str]:
    """The libraries of these index kinds that cannot be imported here."""
    needed = dict.fromkeys(m for kind in kinds for m in INDEX_MODULES.get(kind, ()))
    missing = []
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def require_index_modules(kind: str) -> None:
    """Refuse index.kind `kind` now, before any prefill, when its library is missing."""
    missing = missing_modules([kind])
    if missing:
        raise ConfigError(f"index.kind is {kind}, which needs {' and '.join(missing)}, not "
                          f"installed: pip install {' '.join(PIP_NAMES[m] for m in missing)} "
                          "(or retrieval-attn[index]), or set index.kind: lowrank")


def build_head_index(kind: str, keys: np.ndarray, queries: np.ndarray) -> HeadIndex:
    """keys [n, D] float32 (one kv head), queries [M, D] its group's prefill queries."""
    if kind in ("attention", "hybrid"):
        return AttentionAwareIndex(keys, queries)
    if kind == "faiss-hnsw":
        return FaissHNSWIndex(keys, M=32)
    if kind == "faiss-ivf":
        return FaissIVFIndex(keys)
    if kind == "hnswlib":
        return HnswlibIndex(keys, M=32)
    raise ValueError(f"unknown index kind {kind!r}: one of {', '.join(INDEX_CLASSES)}")


def build_layer_states(kind: str, keys: np.ndarray,
                       queries: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One layer: keys [Hkv, n, D], queries [Hkv, M, D] -> one state dict per kv head.

    Plain arrays only: what a Ray worker hands back and what save_context writes.
    """
    import faiss

    faiss.omp_set_num_threads(1)  # one build per worker core
    return [build_head_index(kind, np.ascontiguousarray(keys[h], dtype=np.float32),
                             np.ascontiguousarray(queries[h], dtype=np.float32)).state()
            for h in range(keys.shape[0])]


@dataclass
class LayerIndex:
    """The indexes of one layer's kv heads over prompt positions [lo, hi)."""

    kind: str
    lo: int
    hi: int
    heads: list[HeadIndex]
    states: list[dict[str, np.ndarray]]  # what they were made from (for save_context)

    @classmethod
    def from_states(cls, kind: str, lo: int, states: list[dict[str, np.ndarray]],
                    keys: list[np.ndarray]) -> LayerIndex:
        """keys: per kv head [hi - lo, D] float32 views of the host store rows."""
        heads = [INDEX_CLASSES[kind].from_state(s, xb) for s, xb in zip(states, keys,
                                                                         strict=True)]
        return cls(kind, lo, lo + keys[0].shape[0], heads, states)

    def nbytes(self) -> dict[str, int]:
        total = {"graph": 0, "copy": 0}
        for h in self.heads:
            for part, n in h.nbytes().items():
                total[part] += n
        return total


class AnnRetriever:
    """Retriever over host indexes with a low-rank fallback (same select() contract)."""

    def __init__(self, kind: str, keys: torch.Tensor, fallback: Retriever, head_dim: int,
                 search_ef: float = 1.5, threads: int = 0) -> None:
        self.kind, self.keys = kind, keys  # keys: the host store's K [L, Hkv, N, D]
        self.fallback, self.scale, self.search_ef = fallback, head_dim**-0.5, search_ef
        self.layers: dict[int, LayerIndex] = {}
        # searches run one per (kv head, query head): the C++ searches release the GIL
        self.pool = ThreadPoolExecutor(threads or os.cpu_count() or 1)
        self.served = {"index": 0, "lowrank": 0}  # layer-steps served by each path
        self.search_s = 0.0

    def reset(self) -> None:
        self.layers.clear()
        self.served = {"index": 0, "lowrank": 0}
        self.search_s = 0.0

    def install(self, layer: int, index: LayerIndex) -> None:
        self.layers[layer] = index

    def memory_bytes(self) -> dict[str, int]:
        """Index graphs and the libraries' key copies, on the host."""
        return {"host": sum(sum(ix.nbytes().values()) for ix in self.layers.values())}

    def select(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, k: int,
               other_lse: torch.Tensor | None = None) -> Selection:
        """q [Hkv, G, D] -> Selection of positions [Hkv, k] int64 and count [1] int32, as
        LowRankRetriever's (positions and count only: the caller reads their K and V).

        The host searches start as soon as q reaches the host, one job per (kv head, query
        head); hybrid's low-rank picks (GPU kernels) and the copy of the window's log-sum-exp
        run while they search. Each head's exact re-rank starts when its G searches are
        done."""
        index = self.layers.get(layer)
        hi_i = int(hi.reshape(-1)[0])
        k = min(k, self.keys.shape[2] - lo)
        count = max(0, min(hi_i - lo, k))
        if index is None or count == 0 or index.lo != lo:
            self.served["lowrank"] += 1
            return self._fallback(layer, q, lo, hi, k, other_lse)
        t0 = time.perf_counter()
        qn = q.float().cpu().numpy()  # [Hkv, G, D]
        hkv, g = qn.shape[:2]
        ef = max(k, int(self.search_ef * k))
        searches = [[self.pool.submit(index.heads[h].search_fast, qn[h, i:i + 1], k, ef)
                     for i in range(g)] for h in range(hkv)]
        extra = None  # overlaps the searches: GPU kernels, then a copy
        if self.kind == "hybrid":
            found = self.fallback.select(layer, q, lo, hi, k, other_lse)
            extra = found.positions.cpu()  # [Hkv, k]
        lse = (other_lse.float().cpu() if other_lse is not None
               else torch.full((hkv, g), float("-inf")))  # [Hkv, G]
        reranks = []
        for h in range(hkv):
            ids = np.concatenate([s.result()[1] for s in searches[h]])  # [G, k], -1 = none
            reranks.append(self.pool.submit(
                self.rerank_head, layer, h, index, ids, qn[h], lse[h], hi_i, count,
                None if extra is None else extra[h, :count]))
        picked = [j.result() for j in reranks]
        self.search_s += time.perf_counter() - t0
        if any(p is None for p in picked):  # too few candidates: rare, low-rank serves
            self.served["lowrank"] += 1
            return self._fallback(layer, q, lo, hi, k, other_lse)
        self.served["index"] += 1
        out = torch.full((hkv, k), lo, dtype=torch.long)
        for h, p in enumerate(picked):
            out[h, :count] = p
        return Selection(out.to(q.device, non_blocking=True),
                         torch.tensor([count], dtype=torch.int32, device=q.device))

    def _fallback(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, k: int,
                  other_lse: torch.Tensor | None) -> Selection:
        """The low-rank retriever's positions and count (its keys and scores dropped: the
        caller reads K and V as for an index's answer)."""
        found = self.fallback.select(layer, q, lo, hi, k, other_lse)
        return Selection(found.positions, found.count)

    def rerank_head(self, layer: int, h: int, index: LayerIndex, ids: np.ndarray,
                    q: np.ndarray, other_lse: torch.Tensor, hi: int, count: int,
                    extra: torch.Tensor | None) -> torch.Tensor | None:
        """One kv head: its G searches' local ids [G, k] and queries q [G, D] -> the best
        `count` positions [count] in [lo, hi), by exact attention shares."""
        cand = np.unique(ids[ids >= 0]) + index.lo
        parts = [torch.from_numpy(cand[cand < hi])]
        if hi > index.hi:  # decoded tokens that left the window: exact scan
            parts.append(torch.arange(index.hi, hi))
        if extra is not None:
            parts.append(extra)
        cand = torch.unique(torch.cat(parts))
        if cand.numel() < count:
            return None
        keys = self.keys[layer, h].index_select(0, cand).float()  # [C, D]
        logits = torch.from_numpy(q) @ keys.T * self.scale  # [G, C]
        total = torch.logaddexp(other_lse, torch.logsumexp(logits, dim=-1))  # [G]
        shares = torch.exp(logits - total[:, None]).sum(dim=0)  # [C]
        return cand[shares.topk(count).indices]
