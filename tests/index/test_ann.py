"""ANN indexes over keys: shapes, recall against exact search, distance counts, memory."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_attn.index.ann import beam_search, csr_from_edges, exact_topk, recall_at_k
from retrieval_attn.index.attention_graph import AttentionAwareIndex

N, D, K = 2000, 32, 10


@pytest.fixture(scope="module")
def data():
    """Keys and queries from different distributions, as in attention (queries shifted)."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    xb *= rng.uniform(0.3, 2.0, size=(N, 1)).astype(np.float32)  # varied key norms
    shift = rng.standard_normal(D).astype(np.float32)
    build_q = (rng.standard_normal((600, D)) + shift).astype(np.float32)
    xq = (rng.standard_normal((40, D)) + shift).astype(np.float32)
    return xb, build_q, xq


def make(kind: str, xb: np.ndarray, build_q: np.ndarray):
    if kind == "attention-aware":
        return AttentionAwareIndex(xb, build_q, n_clusters=16)
    if kind == "faiss-hnsw":
        pytest.importorskip("faiss")
        from retrieval_attn.index.faiss_ann import FaissHNSWIndex
        return FaissHNSWIndex(xb)
    if kind == "faiss-ivf":
        pytest.importorskip("faiss")
        from retrieval_attn.index.faiss_ann import FaissIVFIndex
        return FaissIVFIndex(xb)
    pytest.importorskip("hnswlib")
    from retrieval_attn.index.hnswlib_ann import HnswlibIndex
    return HnswlibIndex(xb)


# (kind, small knob, generous knob)
KINDS = [pytest.param("attention-aware", 10, 200, id="attention-aware"),
         pytest.param("faiss-hnsw", 10, 400, id="faiss-hnsw"),
         pytest.param("faiss-ivf", 1, 30, id="faiss-ivf"),
         pytest.param("hnswlib", 10, 400, id="hnswlib")]


@pytest.mark.parametrize("kind,small,large", KINDS)
def test_search_shapes_recall_and_counts(data, kind, small, large):
    xb, build_q, xq = data
    index = make(kind, xb, build_q)
    _, truth = exact_topk(xq, xb, K)
    dist, ids = index.search(xq, K, large)
    assert dist.shape == (len(xq), K) and ids.shape == (len(xq), K)
    assert recall_at_k(ids, truth).mean() >= 0.9
    many = index.ndis.copy()
    index.search(xq, K, small)
    few = index.ndis.copy()
    assert many.shape == (len(xq),)
    assert (few > 0).all() and (many <= N + 200).all()  # entry/centroid overhead allowed
    assert many.mean() > few.mean()


@pytest.mark.parametrize("kind,small,large", KINDS)
def test_rejects_wrong_dim(data, kind, small, large):
    xb, build_q, xq = data
    index = make(kind, xb, build_q)
    with pytest.raises(AssertionError):
        index.search(xq[:, :-1], K, large)


def test_attention_aware_stores_no_key_copy(data):
    xb, build_q, _ = data
    index = AttentionAwareIndex(xb, build_q, n_clusters=16)
    nbytes = index.nbytes()
    assert nbytes["copy"] == 0 and index.xb is xb
    assert nbytes["graph"] < xb.nbytes  # ids, not vectors
    assert index.degree_stats()["no_in_edges"] == 0


@pytest.mark.parametrize("kind", ["faiss-hnsw", "faiss-ivf", "hnswlib"])
def test_library_indexes_account_for_their_copy(data, kind):
    xb, build_q, _ = data
    assert make(kind, xb, build_q).nbytes()["copy"] == xb.nbytes


def test_planted_low_norm_key_is_found():
    """A low-norm key that one direction of queries needs: no key-only neighbour points to it."""
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    xb[:, 0] = -np.abs(xb[:, 0])  # every key points away from e0 ...
    planted = 123
    xb[planted] = 0.0
    xb[planted, 0] = 0.5  # ... except one short key along e0
    e0 = np.zeros(D, dtype=np.float32)
    e0[0] = 1.0
    noise = 0.05 * rng.standard_normal((300, D)).astype(np.float32)
    build_q = np.concatenate([rng.standard_normal((300, D)).astype(np.float32),
                              4 * e0 + noise])  # some prefill queries want e0
    xq = (4 * e0 + 0.05 * rng.standard_normal((8, D))).astype(np.float32)
    assert (exact_topk(xq, xb, 1)[1] == planted).all()
    index = AttentionAwareIndex(xb, build_q, n_clusters=8)
    _, ids = index.search(xq, K, 50)
    assert (ids == planted).any(axis=1).all()


def test_beam_search_matches_exact_on_complete_graph():
    rng = np.random.default_rng(2)
    n = 50
    xb = rng.standard_normal((n, 8)).astype(np.float32)
    q = rng.standard_normal(8).astype(np.float32)
    src, dst = np.nonzero(~np.eye(n, dtype=bool))
    indptr, indices = csr_from_edges(n, src, dst)
    scores, ids, ndis = beam_search(q, xb, indptr, indices, np.array([0]), ef=5, k=5)
    _, truth = exact_topk(q[None], xb, 5)
    assert list(ids) == list(truth[0]) and ndis == n
    assert np.allclose(scores, xb[ids] @ q, atol=1e-5)
