"""AnnRetriever and the index states: round trips, fast search = reference search, and
decode-time selection against exact top-k over the host store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from retrieval_attn.index.ann import exact_topk, recall_at_k
from retrieval_attn.index.ann_retriever import (
    INDEX_CLASSES,
    AnnRetriever,
    LayerIndex,
    build_head_index,
    build_layer_states,
)
from retrieval_attn.index.base import Selection

pytest.importorskip("faiss")
pytest.importorskip("hnswlib")

N, D, G, HKV = 1500, 32, 3, 2


@pytest.fixture(scope="module")
def head():
    """One kv head's keys and queries from another distribution (as in attention)."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    xb *= rng.uniform(0.3, 2.0, size=(N, 1)).astype(np.float32)
    shift = rng.standard_normal(D).astype(np.float32)
    build_q = (rng.standard_normal((900, D)) + shift).astype(np.float32)
    xq = (rng.standard_normal((12, D)) + shift).astype(np.float32)
    return xb, build_q, xq


@pytest.mark.parametrize("kind", ["attention", "faiss-hnsw", "faiss-ivf", "hnswlib"])
def test_state_round_trip_searches_the_same(kind, head):
    xb, build_q, xq = head
    index = build_head_index(kind, xb, build_q)
    state = index.state()
    assert all(isinstance(a, np.ndarray) for a in state.values())  # no pickled objects
    again = INDEX_CLASSES[kind].from_state(state, xb)
    d1, i1 = index.search_fast(xq, 20, 64)
    d2, i2 = again.search_fast(xq, 20, 64)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)
    with pytest.raises(ValueError):  # keys of another shape are refused
        INDEX_CLASSES[kind].from_state(state, xb[:-1])


def test_attention_fast_search_matches_reference_search(head):
    xb, build_q, xq = head
    index = build_head_index("attention", xb, build_q)
    _, ref = index.search(xq, 30, 120)
    _, fast = index.search_fast(xq, 30, 120)
    assert recall_at_k(fast, ref).mean() >= 0.98
    _, truth = exact_topk(xq, xb, 30)
    assert recall_at_k(fast, truth).mean() >= 0.9


def _retriever(kind, keys, fallback=None):
    """keys [L=1, Hkv, N, D] host tensor; the index covers [lo, hi)."""
    return AnnRetriever(kind, keys, fallback, head_dim=D, search_ef=2.0)


class _Fallback:
    """A stand-in low-rank retriever that records its calls and picks the first k."""

    def __init__(self):
        self.calls = 0

    def select(self, layer, q, lo, hi, k, other_lse=None):
        self.calls += 1
        pos = torch.arange(lo, lo + k).expand(q.shape[0], k)
        return Selection(pos, torch.tensor([min(int(hi) - lo, k)], dtype=torch.int32))


def _setup(kind, head, lo=4, hi=1200):
    xb, build_q, _ = head
    rng = np.random.default_rng(1)
    keys = torch.from_numpy(np.stack([xb, xb[rng.permutation(N)]]))[None]  # [1, 2, N, D]
    fb = _Fallback()
    ret = _retriever(kind, keys, fb)
    queries = np.stack([build_q, build_q])
    states = build_layer_states(kind, keys[0, :, lo:hi].numpy(), queries)
    ret.install(0, LayerIndex.from_states(kind, lo, states,
                                          [keys[0, h, lo:hi].numpy() for h in range(HKV)]))
    return keys, ret, fb


@pytest.mark.parametrize("kind", ["attention", "faiss-hnsw", "hybrid"])
def test_select_finds_the_exact_group_top_k(kind, head):
    _, _, xq = head
    lo, hi_index, k = 4, 1200, 40
    keys, ret, fb = _setup(kind, head, lo, hi_index)
    q = torch.from_numpy(np.stack([xq[:G], xq[G:2 * G]]))  # [Hkv, G, D]
    hi = torch.tensor([1300])  # 100 decoded tokens left the window since the build
    found = ret.select(0, q, lo, hi, k)
    pos, count = found.positions, found.count
    assert pos.shape == (HKV, k) and int(count[0]) == k
    assert ret.served == {"index": 1, "lowrank": 0}
    assert fb.calls == (1 if kind == "hybrid" else 0)
    for h in range(HKV):  # truth: summed softmax shares over [lo, hi), exact keys
        logits = q[h] @ keys[0, h, lo:1300].T * D**-0.5  # [G, n]
        shares = torch.softmax(logits, dim=-1).sum(0)
        truth = shares.topk(k).indices + lo
        got = set(pos[h].tolist())
        assert len(got) == k and all(lo <= p < 1300 for p in got)
        assert len(got & set(truth.tolist())) / k >= 0.9


def test_uninstalled_layer_is_served_by_the_fallback(head):
    keys, ret, fb = _setup("attention", head)
    q = torch.zeros(HKV, G, D)
    ret.select(0, q, 4, torch.tensor([1300]), 10)
    assert ret.served["index"] == 1
    ret.layers.clear()
    ret.select(0, q, 4, torch.tensor([1300]), 10)
    assert ret.served["lowrank"] == 1 and fb.calls == 1


@pytest.mark.parametrize("threads", [1, 5])
def test_split_searches_pick_what_one_search_per_head_picks(threads, head):
    """select runs one search per (kv head, query head) in parallel: the same positions as
    searching each head's G queries together and re-ranking their union, however many
    threads run them."""
    _, _, xq = head
    lo, k = 4, 40
    keys, ret, _ = _setup("attention", head, lo, 1200)
    ret.pool = ThreadPoolExecutor(threads)
    q = torch.from_numpy(np.stack([xq[:G], xq[G:2 * G]]))  # [Hkv, G, D]
    hi = torch.tensor([1300])
    pos = ret.select(0, q, lo, hi, k).positions
    index = ret.layers[0]
    for h in range(HKV):
        _, ids = index.heads[h].search_fast(q[h].numpy(), k, int(ret.search_ef * k))
        want = ret.rerank_head(0, h, index, ids, q[h].numpy(), torch.full((G,), float("-inf")),
                           1300, k, None)
        assert pos[h].tolist() == want.tolist()
