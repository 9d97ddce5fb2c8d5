"""Retrievers against exact top-k on the same queries and keys."""

import dataclasses

import pytest
import torch

from retrieval_attn.index.quest import QuestRetriever
from retrieval_attn.index.retriever import LowRankRetriever, group_scores
from retrieval_attn.offload.lowrank import LowRankKeys

HKV, G, D, N = 2, 3, 16, 200


def exact_topk(q, k, lo, hi, top):
    s = group_scores(q @ k[:, lo:hi].transpose(1, 2), D**-0.5)
    return s.topk(top, dim=-1).indices + lo


def test_full_rank_sketch_selects_the_exact_topk():
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, D, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    found = LowRankRetriever(sketch, D).select(0, q, 10, torch.tensor([150]), 20)
    got, count = found.positions, found.count
    want = exact_topk(q, k, 10, 150, 20)
    assert count.tolist() == [20]
    assert [set(r.tolist()) for r in got] == [set(r.tolist()) for r in want]
    assert got.min() >= 10 and got.max() < 150


def test_rerank_recovers_recall_lost_by_a_small_rank():
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, 2, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    want = exact_topk(q, k, 0, N, 10)

    def recall(sel):
        pairs = zip(sel, want, strict=True)
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in pairs) / 20

    hi = torch.tensor([N])
    plain = recall(LowRankRetriever(sketch, D).select(0, q, 0, hi, 10).positions)
    exact = LowRankRetriever(sketch, D, N, lambda layer, pos: k.gather(
        1, pos[..., None].expand(-1, -1, D)))
    assert recall(exact.select(0, q, 0, hi, 10).positions) == 1.0  # candidates = everything
    assert plain < 1.0


def test_sketch_append_matches_build():
    k = torch.randn(HKV, N, D)
    a = LowRankKeys(1, HKV, N, D, 4, torch.device("cpu"), torch.float32)
    a.build(0, k)
    b = LowRankKeys(1, HKV, N, D, 4, torch.device("cpu"), torch.float32)
    b.build(0, k[:, :150])
    b.basis.copy_(a.basis)
    b.mean.copy_(a.mean)
    for pos in range(N):
        b.append(0, torch.tensor([pos]), k[:, pos:pos + 1])
    torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_quest_bounds_are_upper_bounds_and_pages_stay_inside_the_region():
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    quest = QuestRetriever(1, HKV, N, D, 8, torch.device("cpu"), torch.float32)
    quest.build(0, k[:, :190])
    for pos in range(190, N):
        quest.append(0, torch.tensor([pos]), k[:, pos:pos + 1])
    pages = k.reshape(HKV, N // 8, 8, D)
    true_max = (q[:, :, None, None] * pages[:, None]).sum(-1).amax(-1)  # [Hkv, G, pages]
    bound = torch.maximum(q[:, :, None] * quest.kmin[0][:, None],
                          q[:, :, None] * quest.kmax[0][:, None]).sum(-1)
    assert (bound >= true_max - 1e-5).all()
    # whole pages inside [13, 187): pages 2 .. 22
    found = quest.select(0, q, 13, torch.tensor([187]), 40)
    sel, count = found.positions, found.count
    assert sel.shape == (HKV, 40) and count.tolist() == [40]
    assert sel.min() >= 16 and sel.max() < 184
    found = quest.select(0, q, 13, torch.tensor([40]), 40)
    sel, count = found.positions, found.count  # only pages 2 .. 4 exist
    assert count.tolist() == [24]
    assert sel[:, :24].min() >= 16 and sel[:, :24].max() < 40


def test_low_rank_selection_never_counts_positions_past_hi():
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, 4, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    found = LowRankRetriever(sketch, D).select(0, q, 5, torch.tensor([12]), 20)
    sel, count = found.positions, found.count
    assert count.tolist() == [7]
    assert sorted(sel[0, :7].tolist()) == list(range(5, 12))


class _Unfused:
    """A LowRankKeys seen without its fused `shares`: the retriever then ranks by
    group_scores over sketch.scores, the torch path the fused kernel replaces."""

    def __init__(self, sketch):
        self.sketch, self.capacity = sketch, sketch.capacity

    def scores(self, layer, q, lo, hi):
        return self.sketch.scores(layer, q, lo, hi)


def _fused_and_unfused(k, q, rank, top, rerank, hi, other_lse, dtype=torch.float32):
    hkv, n, d = k.shape
    sketch = LowRankKeys(1, hkv, n, d, rank, k.device, dtype)
    sketch.build(0, k.to(dtype))

    def exact(layer, pos):
        return k.to(dtype).gather(1, pos[..., None].expand(-1, -1, d))

    got = [LowRankRetriever(s, d, rerank, exact, reuse_lse=False).select(
        0, q.to(dtype), 4, hi, top, other_lse) for s in (sketch, _Unfused(sketch))]
    return [(found.positions, found.count) for found in got]


def test_fused_shares_select_what_group_scores_selects():
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    other = torch.randn(HKV, G) + 2
    for rerank, other_lse in ((1, None), (1, other), (3, None), (3, other)):
        (fused, n1), (plain, n2) = _fused_and_unfused(k, q, 4, 20, rerank,
                                                      torch.tensor([190]), other_lse)
        assert n1.tolist() == n2.tolist() == [20]
        assert [set(r.tolist()) for r in fused] == [set(r.tolist()) for r in plain]


@pytest.mark.gpu
def test_fused_selection_matches_the_torch_path_at_128k():
    """Qwen2.5-7B shape, bf16 sketch of rank 32, top 2048 re-ranked from 4x candidates.
    The torch path rounds scores to bf16, the fused one keeps float32, so the two may
    differ on near-ties only."""
    hkv, g, d, n, top = 4, 7, 128, 131072, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(hkv, n, d, device="cuda", generator=gen)
    k[:, 1000:1100] += 0.5 * torch.randn(hkv, 1, d, device="cuda", generator=gen)  # a cluster
    q = torch.randn(hkv, g, d, device="cuda", generator=gen)
    other = torch.randn(hkv, g, device="cuda", generator=gen) + 8
    (fused, _), (plain, _) = _fused_and_unfused(k, q, 32, top, 4,
                                                torch.tensor([n - 600], device="cuda"), other,
                                                torch.bfloat16)
    for a, b in zip(fused.tolist(), plain.tolist(), strict=True):
        assert len(set(a) & set(b)) >= 0.99 * top


@pytest.mark.parametrize("rerank_factor", [1, 4])
def test_select_hands_back_the_chosen_rows_exact_keys(rerank_factor):
    """With re-ranking, the chosen tokens' keys come back (a device gather of the candidates'
    keys), equal to the store's rows; selecting again gives the same. Without: None."""
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, 4, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    reads = []

    def exact_keys(layer, pos):
        reads.append(pos.shape)
        return k.gather(1, pos[..., None].expand(-1, -1, D))

    ret = LowRankRetriever(sketch, D, rerank_factor, exact_keys, reuse_lse=False)
    hi, lse = torch.tensor([N - 20]), torch.randn(HKV, G)
    found = ret.select(0, q, 4, hi, 12, lse)
    pos, count, keys = found.positions, found.count, found.keys
    assert pos.shape == (HKV, 12) and count.tolist() == [12]
    if rerank_factor == 1:
        assert keys is None and not reads
    else:
        assert reads == [(HKV, 48)]  # the candidates' keys, read once
        torch.testing.assert_close(keys, k.gather(1, pos[..., None].expand(-1, -1, D)),
                                   rtol=0, atol=0)
    again = ret.select(0, q, 4, hi, 12, lse)
    assert torch.equal(again.positions, pos) and torch.equal(again.count, count)


def test_sparse_decode_with_reranked_keys_equals_gathering_k_and_v(monkeypatch):
    """SparseKV reads only V for the final set when re-ranking handed back the keys: the
    output equals the path that gathers K and V from the host store."""
    from retrieval_attn.config import KVConfig
    from retrieval_attn.offload.policy import AttnStep
    from retrieval_attn.offload.sparse import SparseKV

    cfg = KVConfig(policy="retrieval", sink_tokens=2, window_tokens=6, top_k=8, rank=4,
                   rerank_factor=3)
    q, k, v = torch.randn(1, 4, 81, D), torch.randn(1, HKV, 81, D), torch.randn(1, HKV, 81, D)

    def decode():
        kv = SparseKV(cfg, 1, 4, HKV, D, 96, torch.device("cpu"), torch.float32)
        kv.start_request()
        kv.attend(0, q[:, :, :70], k[:, :, :70], v[:, :, :70], AttnStep(torch.arange(70), 0))
        kv.finish_layer(0, 70)
        kv.finish_prefill(70)
        return torch.cat([kv.attend(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                    AttnStep(torch.tensor([t]), t)) for t in range(70, 81)])

    v_only = decode()
    keys_seen = []
    plain = LowRankRetriever.select

    def without_keys(self, *args):
        found = plain(self, *args)
        keys_seen.append(found.keys is not None)
        return dataclasses.replace(found, keys=None)

    monkeypatch.setattr(LowRankRetriever, "select", without_keys)
    both = decode()
    assert all(keys_seen) and len(keys_seen) == 11
    torch.testing.assert_close(v_only, both, rtol=0, atol=0)


def test_reused_lse_normalises_by_the_previous_steps_region():
    """reuse_lse (the default): a prompt's first step ranks by shares of the window lse
    alone, the next by the previous step's region lse log-added to its own window lse; a
    repeat of a step (a graph's warm-up) selects what its first run did; prepare (a new
    prompt) forgets. Brute force on the sketch's own scores."""
    torch.manual_seed(3)
    k = torch.randn(HKV, N, D)
    q1, q2 = torch.randn(HKV, G, D), torch.randn(HKV, G, D)
    w1, w2 = torch.randn(HKV, G) + 2, torch.randn(HKV, G) + 2
    sketch = LowRankKeys(1, HKV, N, D, 8, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    ret = LowRankRetriever(sketch, D)
    lo, top = 4, 10

    def truth(q, hi, norm):
        logits = sketch.scores(0, q, lo, hi) * D**-0.5  # [Hkv, G, hi - lo]
        shares = torch.exp(logits - norm[..., None]).sum(1)
        return [set(r.tolist()) for r in shares.topk(top).indices + lo], logits.logsumexp(-1)

    def select(q, hi, w):
        found = ret.select(0, q, lo, torch.tensor([hi]), top, w)
        return [set(r.tolist()) for r in found.positions], found.total

    for _ in range(2):  # the second prompt starts afresh
        ret.prepare(146, top)
        want1, region1 = truth(q1, 150, w1)
        got1, total1 = select(q1, 150, w1)
        assert got1 == want1
        torch.testing.assert_close(total1, w1)
        want2, _ = truth(q2, 151, torch.logaddexp(region1, w2))
        (got2, _), (again2, total2) = select(q2, 151, w2), select(q2, 151, w2)
        assert got2 == want2 and again2 == want2
        torch.testing.assert_close(total2, torch.logaddexp(region1, w2))


def test_prepare_after_a_step_under_inference_mode():
    """Decode steps run under torch.inference_mode and a restored context prepares the
    next prompt outside it: prepare forgets the states instead of writing into them."""
    torch.manual_seed(4)
    sketch = LowRankKeys(1, HKV, N, D, 8, torch.device("cpu"), torch.float32)
    sketch.build(0, torch.randn(HKV, N, D))
    ret = LowRankRetriever(sketch, D)
    q, w = torch.randn(HKV, G, D), torch.randn(HKV, G)
    ret.prepare(146, 10)
    with torch.inference_mode():
        first = ret.select(0, q, 4, torch.tensor([150]), 10, w).positions
    ret.prepare(146, 10)
    assert not ret.lse_state
    again = ret.select(0, q, 4, torch.tensor([150]), 10, w).positions
    assert torch.equal(first, again)
