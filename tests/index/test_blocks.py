"""Block selection (kv.select_block) against brute force on the same queries and keys."""

import pytest
import torch

from retrieval_attn.index.blocks import block_sums, block_tokens, partial_block, slots_for
from retrieval_attn.index.retriever import LowRankRetriever, group_scores
from retrieval_attn.offload.lowrank import LowRankKeys

HKV, G, D, N = 2, 3, 16, 200


def test_block_helpers_against_loops():
    shares = torch.rand(HKV, N - 5)
    lo, hi, P = 5, torch.tensor([47]), 4  # blocks [5, 9), ..., [41, 45) are whole
    sums = block_sums(shares, lo, hi, P)
    assert sums.shape == (HKV, (N - 5) // P)
    for j in range(sums.shape[1]):
        want = shares[:, j * P:j * P + P].sum(-1) if lo + j * P + P <= 47 else -torch.ones(HKV)
        torch.testing.assert_close(sums[:, j], want)
    assert block_tokens(torch.tensor([[0, 3]]), lo, P).tolist() == [[5, 6, 7, 8, 17, 18, 19, 20]]
    # into a view of a wider row (the decode's runs, then the partial run), from kept first
    out = torch.full((2, 10), -1)
    block_tokens(torch.tensor([[0, 3], [1, 0]]), lo, P, lo + torch.arange(P), out=out[:, :8])
    assert out.tolist() == [[5, 6, 7, 8, 17, 18, 19, 20, -1, -1],
                            [9, 10, 11, 12, 5, 6, 7, 8, -1, -1]]
    part, count = partial_block(lo, hi, P, N)
    assert part.tolist() == [45, 46, 47, 48] and count.tolist() == [2]
    part, count = partial_block(lo, torch.tensor([N]), P, N)  # clamped to the capacity
    assert part.max() == N - 1 and count.tolist() == [N - 5 - (N - 5) // P * P]
    assert slots_for(10, 1) == 10 and slots_for(10, 4) == 16


def _truth(q, k, lo, hi, P, nb, other_lse, by_blocks, total=None):
    """Brute force over the whole runs of [lo, hi): the nb runs of largest summed exact
    group share (by_blocks), else the nb·P positions of largest share in those runs.
    total [Hkv, G]: normalise each head's exact scores by this log-sum-exp instead (the
    re-rank uses the sketch's, window included)."""
    scores = q @ k.transpose(1, 2)
    scores[..., :lo] = scores[..., hi:] = float("-inf")
    if total is None:
        shares = group_scores(scores, D**-0.5, other_lse)  # [Hkv, N]
    else:
        shares = torch.exp(scores * D**-0.5 - total[..., None]).sum(1)
    full = (hi - lo) // P
    if not by_blocks:
        return [set(r.tolist()) for r in shares[:, lo:lo + full * P].topk(nb * P).indices + lo]
    sums = torch.stack([shares[:, lo + j * P:lo + j * P + P].sum(-1) for j in range(full)], 1)
    return [set(r.tolist()) for r in sums.topk(nb, dim=-1).indices]


def _sketch_and_reads(k, rank):
    """A sketch of k [HKV, N, D] at `rank`, and exact_keys(layer, positions) that gathers
    from k and records the shape of each read in the returned list."""
    sketch = LowRankKeys(1, HKV, N, D, rank, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    reads = []

    def exact_keys(layer, pos):
        reads.append(pos.shape)
        return k.gather(1, pos[..., None].expand(-1, -1, D))

    return sketch, exact_keys, reads


@pytest.mark.parametrize("rank,rerank,with_lse", [(D, 1, True), (2, 100, True), (2, 100, False)])
def test_block_selection_against_brute_force(rank, rerank, with_lse):
    """Without re-ranking a full-rank sketch picks the runs of largest exact summed share;
    re-ranking (here every run is a candidate) picks the best positions of the candidate
    runs one by one. The partial run before hi follows, counted up to hi."""
    torch.manual_seed(0)
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch, exact_keys, reads = _sketch_and_reads(k, rank)
    lo, hi, P, top = 6, 150, 4, 18  # 36 whole blocks; 5 blocks for a budget of 18
    other = torch.randn(HKV, G) if with_lse else None
    ret = LowRankRetriever(sketch, D, rerank, exact_keys, block=P, reuse_lse=False)
    ret.prepare(hi - lo, top)
    assert ret.use_blocks
    found = ret.select(0, q, lo, torch.tensor([hi]), top, other)
    pos, count, keys = found.positions, found.count, found.keys
    assert pos.shape == (HKV, slots_for(top, P)) and count.tolist() == [5 * P + 0]
    chosen = pos[:, :5 * P]
    assert pos[:, 5 * P:].tolist() == [[150, 151, 152, 153]] * HKV  # partial: none < hi
    if rerank > 1:
        assert [set(r.tolist()) for r in chosen] == _truth(q, k, lo, hi, P, 5, other, False,
                                                           found.total)
        assert reads == [(HKV, 48 * P + P)]  # all blocks to the capacity, and the partial
        torch.testing.assert_close(keys, k.gather(1, pos[..., None].expand(-1, -1, D)))
    else:
        assert ((chosen - lo) % P == torch.arange(5 * P) % P).all()  # whole aligned runs
        assert [set(((r - lo) // P).tolist()) for r in chosen] == _truth(
            q, k, lo, hi, P, 5, other, True)
        assert keys is None and not reads
    again = ret.select(0, q, lo, torch.tensor([hi + 3]), top, other)
    pos2, count2 = again.positions, again.count
    assert count2.tolist() == [5 * P + 3]  # three positions of the partial block are in
    assert pos2[:, 5 * P:].tolist() == [[150, 151, 152, 153]] * HKV
    # no position twice: the partial block may be a candidate run too (a tie at -1), and
    # its positions before hi are not ranked there
    assert all(len(set(r[:5 * P + 3].tolist())) == 5 * P + 3 for r in pos2)


@pytest.mark.parametrize("rerank", [1, 100])
def test_region_end_skips_only_blocks_that_can_never_be_chosen(rerank):
    """region_end (the capacity less the window): blocks past it are left out of the
    top-k, and the last block wholly before it still competes (here it is the best)."""
    torch.manual_seed(3)
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    lo, hi, P, top = 6, 150, 4, 18
    k[:, hi - P:hi] = 3 * q.sum(1, keepdim=True)  # the last whole block [146, 150) wins
    sketch, exact_keys, reads = _sketch_and_reads(k, D)
    ret = LowRankRetriever(sketch, D, rerank, exact_keys, block=P, reuse_lse=False,
                           region_end=hi)
    ret.prepare(hi - lo, top)
    other = torch.randn(HKV, G)
    found = ret.select(0, q, lo, torch.tensor([hi]), top, other)
    pos, count = found.positions, found.count
    chosen = pos[:, :5 * P]
    assert count.tolist() == [5 * P] and all(set(range(hi - P, hi)) <= set(r.tolist())
                                             for r in chosen)
    if rerank > 1:
        assert reads == [(HKV, 36 * P + P)]  # the 36 whole blocks before 150, the partial
        assert [set(r.tolist()) for r in chosen] == _truth(q, k, lo, hi, P, 5, other, False,
                                                           found.total)
    else:
        assert [set(((r - lo) // P).tolist()) for r in chosen] == _truth(
            q, k, lo, hi, P, 5, other, True)


def test_rerank_blocks_keeps_the_runs_of_largest_exact_mass_whole():
    """kv.rerank_blocks: every run is a candidate here, so the chosen runs are the runs of
    largest summed exact share (normalised as the re-rank does), each whole."""
    torch.manual_seed(2)
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, 2, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    lo, hi, P, top = 6, 150, 4, 18
    ret = LowRankRetriever(sketch, D, 100, lambda layer, pos: k.gather(
        1, pos[..., None].expand(-1, -1, D)), block=P, reuse_lse=False, rerank_blocks=True)
    ret.prepare(hi - lo, top)
    other = torch.randn(HKV, G)
    found = ret.select(0, q, lo, torch.tensor([hi]), top, other)
    pos, count, keys = found.positions, found.count, found.keys
    chosen = pos[:, :5 * P]
    assert count.tolist() == [5 * P] and ((chosen - lo) % P == torch.arange(5 * P) % P).all()
    assert [set(((r - lo) // P).tolist()) for r in chosen] == _truth(
        q, k, lo, hi, P, 5, other, True, found.total)
    torch.testing.assert_close(keys, k.gather(1, pos[..., None].expand(-1, -1, D)))


def test_rerank_reads_candidate_keys_in_runs():
    """With re-ranking the keys read from the host are whole runs of P (the point of
    blocks), while the chosen positions need not be."""
    torch.manual_seed(1)
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, 4, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    reads = []

    def exact_keys(layer, pos):
        reads.append(pos.clone())
        return k.gather(1, pos[..., None].expand(-1, -1, D))

    ret = LowRankRetriever(sketch, D, 2, exact_keys, block=4)
    ret.prepare(150, 16)
    pos = ret.select(0, q, 2, torch.tensor([152]), 16, torch.randn(HKV, G)).positions
    runs = reads[0][:, :32]  # 8 candidate runs of 4, then the partial run
    assert ((runs - 2) % 4 == torch.arange(32) % 4).all()
    first = runs[:, ::4, None].expand(-1, -1, 4).reshape(HKV, 32)  # each run's start
    assert ((runs - 2) // 4 == (first - 2) // 4).all()
    assert all(set(p[:16].tolist()) <= set(r.tolist()) for p, r in zip(pos, runs, strict=True))


def test_a_region_shorter_than_the_blocks_is_attended_whole():
    k, q = torch.randn(HKV, N, D), torch.randn(HKV, G, D)
    sketch = LowRankKeys(1, HKV, N, D, 4, torch.device("cpu"), torch.float32)
    sketch.build(0, k)
    ret = LowRankRetriever(sketch, D, block=8)
    ret.prepare(30, 40)  # 40 tokens are 5 blocks; the region holds 30 positions
    assert not ret.use_blocks and ret.ordered
    found = ret.select(0, q, 4, torch.tensor([34]), 40)
    pos, count = found.positions, found.count
    assert count.tolist() == [30] and pos.shape == (HKV, 48)
    assert [sorted(r[:30].tolist()) for r in pos] == [list(range(4, 34))] * HKV
