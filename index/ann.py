"""Shared pieces of the ANN indexes over keys: exact top-k, graph beam search, recall.

Layout: keys xb [N, D] and queries xq [nq, D], float32 numpy (the host KV store's rows of
one kv head); results are faiss-style (D, I): scores [nq, k] (inner products, best first)
and ids [nq, k] int64 into xb. Every index reports `ndis` [nq], the number of query-vector
distances (inner products) its last search computed, entry points and centroids included,
so "fraction of keys visited" = ndis / N.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch


def exact_topk(xq: np.ndarray, xb: np.ndarray, k: int, batch: int = 1024,
               device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k by torch matmul + topk (on the GPU when present).

    xq [nq, D], xb [N, D] -> (D [nq, k] float32, I [nq, k] int64), best first.
    """
    nq, d = xq.shape
    n, d2 = xb.shape
    assert d == d2, (xq.shape, xb.shape)
    k = min(k, n)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = torch.as_tensor(xb, dtype=torch.float32, device=dev)
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    for s in range(0, nq, batch):
        q = torch.as_tensor(xq[s:s + batch], dtype=torch.float32, device=dev)
        top = (q @ base.T).topk(k, dim=1)
        out_d[s:s + batch] = top.values.cpu().numpy()
        out_i[s:s + batch] = top.indices.cpu().numpy()
    return out_d, out_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """found [nq, k'] ids, truth [nq, k] ids -> [nq] fraction of truth found."""
    assert found.shape[0] == truth.shape[0], (found.shape, truth.shape)
    return np.array([np.isin(t, f).mean() for f, t in zip(found, truth, strict=True)])


def beam_search(q: np.ndarray, xb: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                entries: np.ndarray, ef: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-first search of one query over a graph in CSR form (HNSW's base-layer search).

    q [D]; xb [N, D]; neighbours of node u are indices[indptr[u]:indptr[u + 1]]; entries
    [E] node ids to start from. Keeps the ef best nodes seen, expands the best unexpanded
    candidate until it is worse than the ef-th best. Each expansion scores all unvisited
    neighbours in one matmul. Returns (scores [k], ids [k], distances computed).
    """
    visited = np.zeros(xb.shape[0], dtype=bool)
    entries = np.unique(entries)
    visited[entries] = True
    scores = xb[entries] @ q
    ndis = entries.size
    cand = [(-s, u) for s, u in zip(scores.tolist(), entries.tolist(), strict=True)]
    heapq.heapify(cand)
    top = sorted((s, u) for s, u in zip(scores.tolist(), entries.tolist(), strict=True))
    top = top[-ef:]
    heapq.heapify(top)
    while cand:
        neg, u = heapq.heappop(cand)
        if len(top) >= ef and -neg < top[0][0]:
            break
        nb = indices[indptr[u]:indptr[u + 1]]
        nb = nb[~visited[nb]]
        if nb.size == 0:
            continue
        visited[nb] = True
        ndis += nb.size
        for s, v in zip((xb[nb] @ q).tolist(), nb.tolist(), strict=True):
            if len(top) < ef or s > top[0][0]:
                heapq.heappush(cand, (-s, v))
                heapq.heappush(top, (s, v))
                if len(top) > ef:
                    heapq.heappop(top)
    best = heapq.nlargest(k, top)
    return (np.array([s for s, _ in best], dtype=np.float32),
            np.array([v for _, v in best], dtype=np.int64), ndis)


def csr_from_edges(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges (src -> dst), already de-duplicated -> CSR (indptr [n+1], indices)."""
    order = np.argsort(src, kind="stable")
    indices = dst[order].astype(np.int32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    return indptr, indices
