"""Thin faiss wrappers over one head's keys, inner-product metric (keys only, no queries).

What they add to faiss: shape checks, a single search knob, the per-query count of
distances computed (`ndis`, from faiss's global search statistics) and a byte count.
faiss is imported when an index is built, never at module import.
Both faiss indexes keep their own float32 copy of the keys: counted in nbytes()["copy"].
`search` counts distances query by query; `search_fast` is one batched faiss call (decode).
state()/from_state() hand an index over as faiss's own serialization (a uint8 array).
"""

from __future__ import annotations

import time

import numpy as np


def _faiss():
    import faiss

    faiss.omp_set_num_threads(1)  # per-query statistics are exact single-threaded
    return faiss


class FaissHNSWIndex:
    """IndexHNSWFlat, METRIC_INNER_PRODUCT. Knob: efSearch. ndis from faiss.cvar.hnsw_stats."""

    def __init__(self, xb: np.ndarray, M: int = 32, ef_construction: int = 40) -> None:
        self.n, self.d = xb.shape
        faiss = _faiss()
        t0 = time.perf_counter()
        self.index = faiss.IndexHNSWFlat(self.d, M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(np.ascontiguousarray(xb, dtype=np.float32))
        self.build_s = time.perf_counter() - t0
        self.ndis = np.zeros(0, dtype=np.int64)

    def state(self) -> dict[str, np.ndarray]:
        return _state(self.index, self.build_s)

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], xb: np.ndarray) -> FaissHNSWIndex:
        self = cls.__new__(cls)
        self.index, self.build_s = _from_state(state, xb)
        self.n, self.d = xb.shape
        self.ndis = np.zeros(0, dtype=np.int64)
        return self

    def search_fast(self, xq: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        params = _faiss().SearchParametersHNSW(efSearch=max(ef, k))
        return self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k, params=params)

    def search(self, xq: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        """xq [nq, D] -> (D [nq, k], I [nq, k]); ndis [nq] is the per-query mean count."""
        nq, d = xq.shape
        assert d == self.d, (xq.shape, self.d)
        faiss = _faiss()
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        ndis = np.empty(nq, dtype=np.int64)
        out_d = np.empty((nq, k), dtype=np.float32)
        out_i = np.empty((nq, k), dtype=np.int64)
        for i in range(nq):  # one at a time: hnsw_stats is a global sum
            faiss.cvar.hnsw_stats.reset()
            out_d[i:i + 1], out_i[i:i + 1] = self.index.search(
                np.ascontiguousarray(xq[i:i + 1], dtype=np.float32), k, params=params)
            ndis[i] = faiss.cvar.hnsw_stats.ndis
        self.ndis = ndis
        return out_d, out_i

    def nbytes(self) -> dict[str, int]:
        hnsw = self.index.hnsw
        graph = 4 * hnsw.neighbors.size() + 8 * hnsw.offsets.size() + 4 * hnsw.levels.size()
        return {"graph": graph, "copy": 4 * self.n * self.d}


class FaissIVFIndex:
    """IndexIVFFlat over an IndexFlatIP quantizer. Knob: nprobe.

    ndis = nlist centroid scores + list entries scanned (faiss.cvar.indexIVF_stats.ndis).
    """

    def __init__(self, xb: np.ndarray, nlist: int | None = None, seed: int = 0) -> None:
        self.n, self.d = xb.shape
        faiss = _faiss()
        self.nlist = nlist or max(1, int(round(np.sqrt(self.n))))
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(self.d)
        self.index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist,
                                        faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        x = np.ascontiguousarray(xb, dtype=np.float32)
        self.index.train(x)
        self.index.add(x)
        self.quantizer = quantizer  # the IVF index does not own it: keep it alive
        self.build_s = time.perf_counter() - t0
        self.ndis = np.zeros(0, dtype=np.int64)

    def state(self) -> dict[str, np.ndarray]:
        return _state(self.index, self.build_s)

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], xb: np.ndarray) -> FaissIVFIndex:
        self = cls.__new__(cls)
        self.index, self.build_s = _from_state(state, xb)  # owns its quantizer
        self.n, self.d = xb.shape
        self.nlist, self.quantizer = self.index.nlist, None
        self.ndis = np.zeros(0, dtype=np.int64)
        return self

    def search_fast(self, xq: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        params = _faiss().SearchParametersIVF(nprobe=min(nprobe, self.nlist))
        return self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k, params=params)

    def search(self, xq: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """xq [nq, D] -> (D [nq, k], I [nq, k])."""
        nq, d = xq.shape
        assert d == self.d, (xq.shape, self.d)
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist))
        ndis = np.empty(nq, dtype=np.int64)
        out_d = np.empty((nq, k), dtype=np.float32)
        out_i = np.empty((nq, k), dtype=np.int64)
        for i in range(nq):
            faiss.cvar.indexIVF_stats.reset()
            out_d[i:i + 1], out_i[i:i + 1] = self.index.search(
                np.ascontiguousarray(xq[i:i + 1], dtype=np.float32), k, params=params)
            ndis[i] = self.nlist + faiss.cvar.indexIVF_stats.ndis
        self.ndis = ndis
        return out_d, out_i

    def nbytes(self) -> dict[str, int]:
        ids = 8 * self.n  # inverted lists store int64 ids beside the codes
        return {"graph": ids + 4 * self.nlist * self.d, "copy": 4 * self.n * self.d}


def _state(index, build_s: float) -> dict[str, np.ndarray]:
    return {"faiss": _faiss().serialize_index(index), "build_s": np.array([build_s])}


def _from_state(state: dict[str, np.ndarray], xb: np.ndarray):
    index = _faiss().deserialize_index(np.ascontiguousarray(state["faiss"], dtype=np.uint8))
    if index.ntotal != xb.shape[0] or index.d != xb.shape[1]:
        raise ValueError(f"faiss index holds {index.ntotal} keys of dim {index.d}; "
                         f"the store has {xb.shape[0]} of dim {xb.shape[1]}")
    return index, float(state["build_s"][0])
