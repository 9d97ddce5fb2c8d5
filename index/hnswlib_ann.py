"""Thin hnswlib wrapper (space 'ip') with distance counting by replaying its search.

hnswlib has no search statistics. This wrapper reads the built graph back from hnswlib's
own serialized format (save_index: header, level-0 block, upper-level link lists) and
replays hnswlib's search algorithm on it in numpy (greedy descent through the upper
levels, then the base-layer best-first search with ef = max(ef, k)), counting every inner
product. Results come from hnswlib itself; the replay only counts distances.
`replay_agreement` (mean overlap of replayed and hnswlib ids) says how faithful the count
is. hnswlib keeps its own float32 copy of the keys: counted in nbytes()["copy"].
`search_fast` is hnswlib's search alone (decode); state()/from_state() carry hnswlib's own
serialized format as a uint8 array.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

import numpy as np

from retrieval_attn.index.ann import beam_search

_HEADER = struct.Struct("<6Q i I 3Q d Q")  # hnswlib HierarchicalNSW::saveIndex


class HnswlibIndex:
    """hnswlib.Index(space='ip'). Knob: ef. ndis [nq] from the replay (see module doc)."""

    def __init__(self, xb: np.ndarray, M: int = 32, ef_construction: int = 40) -> None:
        import hnswlib

        self.n, self.d = xb.shape
        self.xb = xb  # a reference for the replay, not a copy
        t0 = time.perf_counter()
        self.index = hnswlib.Index(space="ip", dim=self.d)
        self.index.init_index(max_elements=self.n, M=M, ef_construction=ef_construction,
                              random_seed=0)
        self.index.add_items(np.ascontiguousarray(xb, dtype=np.float32),
                             np.arange(self.n), num_threads=1)
        self.build_s = time.perf_counter() - t0
        self.upper: list[dict[int, np.ndarray]] | None = None  # read on the first search()
        self.ndis = np.zeros(0, dtype=np.int64)
        self.replay_agreement = float("nan")

    def _serialized(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "hnsw.bin")
            self.index.save_index(path)
            return open(path, "rb").read()

    def state(self) -> dict[str, np.ndarray]:
        return {"hnswlib": np.frombuffer(self._serialized(), dtype=np.uint8),
                "build_s": np.array([self.build_s])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], xb: np.ndarray) -> HnswlibIndex:
        import hnswlib

        self = cls.__new__(cls)
        self.n, self.d = xb.shape
        self.xb, self.build_s = xb, float(state["build_s"][0])
        self.index = hnswlib.Index(space="ip", dim=self.d)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "hnsw.bin")
            with open(path, "wb") as f:
                f.write(np.ascontiguousarray(state["hnswlib"]).tobytes())
            self.index.load_index(path, max_elements=self.n)
        if self.index.get_current_count() != self.n:
            raise ValueError(f"hnswlib index holds {self.index.get_current_count()} keys; "
                             f"the store has {self.n}")
        self.upper, self.ndis, self.replay_agreement = None, np.zeros(0, np.int64), float("nan")
        return self

    def search_fast(self, xq: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.set_ef(max(ef, k))
        labels, dist = self.index.knn_query(np.ascontiguousarray(xq, dtype=np.float32), k=k)
        return (1.0 - dist).astype(np.float32), labels.astype(np.int64)

    def _read_graph(self) -> None:
        raw = self._serialized()
        (off0, max_el, count, size_el, label_off, _data_off, maxlevel, entry, max_m,
         max_m0, _m, _mult, _efc) = _HEADER.unpack_from(raw, 0)
        pos = _HEADER.size
        level0 = np.frombuffer(raw, dtype=np.uint8, count=max_el * size_el, offset=pos)
        level0 = level0.reshape(max_el, size_el)[:count]
        pos += max_el * size_el
        labels = level0[:, label_off:label_off + 8].copy().view(np.int64)[:, 0]
        links0 = level0[:, off0:off0 + 4 * (max_m0 + 1)].copy().view(np.uint32)
        deg0 = (links0[:, 0] & 0xFFFF).astype(np.int64)
        to_label = labels  # internal id -> label (= key id)
        src = np.repeat(np.arange(count), deg0)
        mask = np.arange(max_m0)[None, :] < deg0[:, None]
        dst = links0[:, 1:][mask].astype(np.int64)
        order = np.argsort(to_label[src], kind="stable")
        self.indices = to_label[dst][order].astype(np.int32)
        self.indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(np.bincount(to_label[src], minlength=self.n), out=self.indptr[1:])
        self.upper: list[dict[int, np.ndarray]] = [{} for _ in range(maxlevel + 1)]
        block = 4 * (max_m + 1)
        for internal in range(count):
            (size,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            for lev in range(size // block):
                ll = np.frombuffer(raw, dtype=np.uint32, count=max_m + 1,
                                   offset=pos + lev * block)
                nb = ll[1:1 + (int(ll[0]) & 0xFFFF)].astype(np.int64)
                self.upper[lev + 1][int(to_label[internal])] = to_label[nb]
            pos += size
        self.entry, self.maxlevel = int(to_label[entry]), maxlevel
        self.graph_bytes = count * 4 * (max_m0 + 1) + sum(
            4 * (max_m + 1) * len(level) for level in self.upper[1:])

    def _descend(self, q: np.ndarray) -> tuple[int, int]:
        """Greedy walk through the upper levels -> (base-layer entry, distances)."""
        cur = self.entry
        best = float(self.xb[cur] @ q)
        ndis = 1
        for lev in range(self.maxlevel, 0, -1):
            changed = True
            while changed:
                changed = False
                nb = self.upper[lev].get(cur)
                if nb is None or nb.size == 0:
                    break
                s = self.xb[nb] @ q
                ndis += nb.size
                j = int(np.argmax(s))
                if s[j] > best:
                    best, cur, changed = float(s[j]), int(nb[j]), True
        return cur, ndis

    def search(self, xq: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        """xq [nq, D] -> (D [nq, k] inner products, I [nq, k])."""
        nq, d = xq.shape
        assert d == self.d, (xq.shape, self.d)
        ef = max(ef, k)
        if self.upper is None:
            self._read_graph()
        self.index.set_ef(ef)
        labels, dist = self.index.knn_query(np.ascontiguousarray(xq, dtype=np.float32), k=k,
                                            num_threads=1)
        ndis = np.empty(nq, dtype=np.int64)
        agree = np.empty(nq)
        for i in range(nq):
            q = np.asarray(xq[i], dtype=np.float32)
            start, n_up = self._descend(q)
            _, ids, n_base = beam_search(q, self.xb, self.indptr, self.indices,
                                         np.array([start]), ef, k)
            ndis[i] = n_up + n_base
            agree[i] = np.isin(ids, labels[i]).mean()
        self.ndis, self.replay_agreement = ndis, float(agree.mean())
        return (1.0 - dist).astype(np.float32), labels.astype(np.int64)

    def nbytes(self) -> dict[str, int]:
        if self.upper is None:
            self._read_graph()
        return {"graph": self.graph_bytes, "copy": 4 * self.n * self.d}
