"""AttentionAwareIndex: a graph over one kv head's keys built from its prefill queries.

Decode queries and keys lie in different distributions, so a graph built from key-to-key
neighbourhoods leads a query astray, and keys that no other key points to (low norm:
punctuation, whitespace) are unreachable although queries want them. This index builds
the graph from what queries retrieve (RetrievalAttention / RoarGraph style):

1. Exact top-`build_topk` keys of each build query (a sample of the layer's prefill
   queries, all G query heads of the group), by torch matmul + topk (GPU when present).
2. Co-retrieval edges, the query->key bipartite kNN graph projected onto keys: in each
   query's ranked list, rank 1 links to every other rank (star) and consecutive ranks
   link to each other; both directions. Each key keeps its `max_degree` most
   co-retrieved neighbours.
3. Reachability: every key with fewer than `min_in_edges` co-retrieval in-edges is
   linked both ways to its `orphan_links` cosine-nearest well-covered keys, so no key
   is left without a way in (the low-norm keys decode queries still ask for).
4. Query-guided entry points: k-means of the build queries into `n_clusters` centroids,
   each with its exact top-`entry_keys` keys. A search scores the centroids, seeds the
   beam with the top keys of the best `entry_probe` centroids, and runs best-first beam
   search (inner product). ndis counts centroids, entry keys and every neighbour scored.

Stores ids only (CSR int32 edges + the entry table); keys are read from the caller's
array, never copied. `search` is the reference (numpy, counts every distance);
`search_fast` runs the same best-first search in faiss's C++ level-0 HNSW search over this
graph (same results; used at decode time) and needs a float32 copy of the keys inside
faiss, counted in nbytes()["copy"] once made.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from retrieval_attn.index.ann import beam_search, csr_from_edges, exact_topk


class AttentionAwareIndex:
    """Knob: ef (beam width, >= k). xb [N, D] keys; xq_build [M, D] prefill queries."""

    def __init__(self, xb: np.ndarray, xq_build: np.ndarray, build_topk: int = 64,
                 max_degree: int = 24, min_in_edges: int = 2, orphan_links: int = 4,
                 n_clusters: int = 64, entry_keys: int = 32, entry_probe: int = 2,
                 seed: int = 0) -> None:
        self.n, self.d = xb.shape
        m, d = xq_build.shape
        assert d == self.d, (xq_build.shape, xb.shape)
        self.xb = xb  # a reference into the host store, not a copy
        self.entry_probe = entry_probe
        t0 = time.perf_counter()
        _, top = exact_topk(xq_build, xb, build_topk)  # [M, K] best first
        src, dst, weight = _co_retrieval_edges(top, self.n)
        src, dst = _cap_degree(src, dst, weight, self.n, max_degree)
        src, dst = _link_orphans(xb, src, dst, min_in_edges, orphan_links)
        self.indptr, self.indices = csr_from_edges(self.n, src, dst)
        self.centroids = _kmeans(xq_build, min(n_clusters, m), seed)  # [C, D]
        _, self.entry_table = exact_topk(self.centroids, xb, entry_keys)  # [C, E]
        self.entry_table = self.entry_table.astype(np.int32)
        self.build_s = time.perf_counter() - t0
        self.ndis = np.zeros(0, dtype=np.int64)
        self._faiss = None

    # -- state: plain arrays, for Ray hand-back and save/load (no pickle) ---------------
    def state(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "centroids": self.centroids,
                "entry_table": self.entry_table,
                "meta": np.array([self.n, self.d, self.entry_probe], dtype=np.int64),
                "build_s": np.array([self.build_s])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], xb: np.ndarray) -> AttentionAwareIndex:
        n, d, probe = (int(x) for x in state["meta"])
        if xb.shape != (n, d):
            raise ValueError(f"attention index over {n} keys of dim {d}; got keys {xb.shape}")
        self = cls.__new__(cls)
        self.n, self.d, self.entry_probe, self.xb = n, d, probe, xb
        self.indptr, self.indices = state["indptr"], state["indices"]
        self.centroids, self.entry_table = state["centroids"], state["entry_table"]
        self.build_s = float(state["build_s"][0])
        self.ndis, self._faiss = np.zeros(0, dtype=np.int64), None
        return self

    def search(self, xq: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        """xq [nq, D] -> (D [nq, k] inner products, I [nq, k]); ndis [nq] set."""
        nq, d = xq.shape
        assert d == self.d, (xq.shape, self.d)
        ef = max(ef, k)
        out_d = np.full((nq, k), -np.inf, dtype=np.float32)
        out_i = np.full((nq, k), -1, dtype=np.int64)
        ndis = np.empty(nq, dtype=np.int64)
        csc = xq.astype(np.float32) @ self.centroids.T  # [nq, C]: C distances per query
        best = np.argsort(-csc, axis=1)[:, :self.entry_probe]
        for i in range(nq):
            entries = self.entry_table[best[i]].ravel()
            s, ids, nd = beam_search(np.asarray(xq[i], dtype=np.float32), self.xb,
                                     self.indptr, self.indices, entries, ef, k)
            out_d[i, :ids.size], out_i[i, :ids.size] = s, ids
            ndis[i] = nd + self.centroids.shape[0]
        self.ndis = ndis
        return out_d, out_i

    def _entries(self, xq: np.ndarray) -> np.ndarray:
        """Entry key ids [nq, probe * E] int32: the best centroids' top keys, each once,
        padded with -1 (where faiss stops reading a row)."""
        best = np.argsort(-(xq @ self.centroids.T), axis=1)[:, :self.entry_probe]
        rows = np.sort(self.entry_table[best].reshape(xq.shape[0], -1), axis=1)
        rows[:, 1:][rows[:, 1:] == rows[:, :-1]] = -1
        rows = -np.sort(-rows, axis=1)  # ids first, -1s last
        return np.ascontiguousarray(rows, dtype=np.int32)

    def search_fast(self, xq: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        """Like search, in faiss (C++): xq [nq, D] -> (D [nq, k], I [nq, k]); -1 = none."""
        import faiss

        if self._faiss is None:
            self._faiss = _faiss_level0(self.xb, self.indptr, self.indices)
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nq, ef = xq.shape[0], max(ef, k)
        entries = self._entries(xq)  # [nq, E]
        entry_d = np.ascontiguousarray(np.einsum("qd,qed->qe", xq, self.xb[entries]),
                                       dtype=np.float32)  # -1 rows score junk, never read
        out_d = np.empty((nq, k), dtype=np.float32)
        out_i = np.empty((nq, k), dtype=np.int64)
        params = faiss.SearchParametersHNSW(efSearch=ef)
        # search_type 2: all entry points seed one beam, as in `search`
        self._faiss.search_level_0(nq, faiss.swig_ptr(xq), k, faiss.swig_ptr(entries),
                                   faiss.swig_ptr(entry_d), faiss.swig_ptr(out_d),
                                   faiss.swig_ptr(out_i), entries.shape[1], 2, params)
        return out_d, out_i

    def nbytes(self) -> dict[str, int]:
        graph = self.indices.nbytes + self.indptr.nbytes + self.entry_table.nbytes
        copy = 0 if self._faiss is None else 4 * self.n * self.d
        return {"graph": graph + self.centroids.nbytes, "copy": copy}

    def degree_stats(self) -> dict[str, float]:
        deg = np.diff(self.indptr)
        indeg = np.bincount(self.indices, minlength=self.n)
        return {"mean_degree": float(deg.mean()), "max_degree": int(deg.max()),
                "no_in_edges": int((indeg == 0).sum())}


def _faiss_level0(xb: np.ndarray, indptr: np.ndarray, indices: np.ndarray):
    """A faiss IndexHNSWFlat (inner product) whose level 0 is this CSR graph, no upper
    levels: faiss's level-0 search then walks our graph in C++."""
    import faiss

    n, d = xb.shape
    deg = np.diff(indptr)
    slots_m = max(1, (int(deg.max(initial=0)) + 1) // 2)  # level 0 has 2·M slots per node
    index = faiss.IndexHNSWFlat(d, slots_m, faiss.METRIC_INNER_PRODUCT)
    index.storage.add(np.ascontiguousarray(xb, dtype=np.float32))
    index.ntotal = n
    hnsw, slots = index.hnsw, index.hnsw.nb_neighbors(0)
    faiss.copy_array_to_vector(np.ones(n, dtype=np.int32), hnsw.levels)
    faiss.copy_array_to_vector(np.arange(n + 1, dtype=np.uint64) * slots, hnsw.offsets)
    table = np.full((n, slots), -1, dtype=np.int32)
    rows = np.repeat(np.arange(n), deg)
    table[rows, np.arange(indices.size) - indptr[rows]] = indices
    faiss.copy_array_to_vector(table.ravel(), hnsw.neighbors)
    hnsw.entry_point, hnsw.max_level = 0, 0
    return index


def _co_retrieval_edges(top: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """top [M, K] ranked key ids -> unique directed edges (src, dst) and their counts."""
    star_s = np.repeat(top[:, :1], top.shape[1] - 1, axis=1).ravel()
    star_d = top[:, 1:].ravel()
    chain_s, chain_d = top[:, :-1].ravel(), top[:, 1:].ravel()
    s = np.concatenate([star_s, star_d, chain_s, chain_d])
    t = np.concatenate([star_d, star_s, chain_d, chain_s])
    keep = s != t
    pair, count = np.unique(s[keep] * n + t[keep], return_counts=True)
    return pair // n, pair % n, count


def _cap_degree(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, n: int,
                cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each node's `cap` heaviest out-edges."""
    order = np.lexsort((-weight, src))
    src, dst = src[order], dst[order]
    first = np.searchsorted(src, src, side="left")
    keep = np.arange(src.size) - first < cap
    return src[keep], dst[keep]


def _link_orphans(xb: np.ndarray, src: np.ndarray, dst: np.ndarray, min_in: int,
                  links: int) -> tuple[np.ndarray, np.ndarray]:
    """Link poorly reachable keys both ways to their cosine-nearest well-covered keys."""
    n = xb.shape[0]
    indeg = np.bincount(dst, minlength=n)
    orphans = np.flatnonzero(indeg < min_in)
    covered = np.flatnonzero(indeg >= min_in)
    if orphans.size == 0 or covered.size == 0 or links == 0:
        return src, dst
    unit = xb / np.maximum(np.linalg.norm(xb, axis=1, keepdims=True), 1e-12)
    _, near = exact_topk(unit[orphans], unit[covered], links)
    near = covered[near].ravel()
    rep = np.repeat(orphans, near.size // orphans.size)
    s = np.concatenate([src, rep, near])
    t = np.concatenate([dst, near, rep])
    pair = np.sort(s * n + t)  # unique by sort: numpy's hash unique was 6x slower here
    pair = pair[np.concatenate([[True], pair[1:] != pair[:-1]])]
    return pair // n, pair % n


def _kmeans(x: np.ndarray, c: int, seed: int, iters: int = 10) -> np.ndarray:
    """Plain k-means (L2) of x [M, D] -> centroids [C, D] float32."""
    g = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    cent = xt[torch.randperm(xt.shape[0], generator=g)[:c]].clone()
    for _ in range(iters):
        assign = torch.cdist(xt, cent).argmin(dim=1)
        sums = torch.zeros_like(cent).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=c).clamp_min(1)[:, None]
        moved = sums / counts
        empty = torch.bincount(assign, minlength=c) == 0
        cent = torch.where(empty[:, None], cent, moved)
    return cent.numpy()
