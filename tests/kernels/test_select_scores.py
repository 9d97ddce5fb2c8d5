"""select_scores against select_scores_ref (float32 both): shares, lse, and the top-k they give."""

import pytest
import torch

from retrieval_attn.kernels.formats import (
    LseState,
    pack_int4,
    quantize_query,
    sketch_values,
    unpack_int4,
)
from retrieval_attn.kernels.select_scores import select_scores, select_scores_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(hkv, g, d, r, n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hkv, g, d, generator=gen).to(dtype)
    basis = (torch.randn(hkv, d, r, generator=gen) / d**0.5).to(dtype)
    mean = (0.3 * torch.randn(hkv, d, generator=gen)).to(dtype)
    keys = (2 * torch.randn(hkv, n, r, generator=gen)).to(dtype)
    other = torch.randn(hkv, g, generator=gen) + 3
    return [t.to(device) for t in (q, basis, mean, keys, other)]


@pytest.mark.parametrize(
    "hkv, g, d, r, n, lo, hi, with_other, dtype",
    [
        pytest.param(2, 3, 32, 16, 300, 4, 250, True, torch.float32, id="g3-hi<N"),
        pytest.param(1, 7, 64, 32, 700, 0, 700, False, torch.bfloat16, id="g7-bf16-no-other"),
        pytest.param(3, 4, 32, 16, 517, 4, 517, True, torch.float16, id="fp16-odd-n"),
        pytest.param(2, 8, 32, 16, 100, 4, 60, True, torch.bfloat16, id="g8-short"),
    ],
)
def test_select_scores_matches_reference(hkv, g, d, r, n, lo, hi, with_other, dtype):
    q, basis, mean, keys, other = _inputs(hkv, g, d, r, n, dtype)
    other = other if with_other else None
    hi_t = torch.tensor([hi])
    want, want_lse = select_scores_ref(q, basis, mean, keys, lo, hi_t, d**-0.5, other)
    got, got_lse = select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo,
                                 hi_t.to(DEVICE), d**-0.5,
                                 other.to(DEVICE) if other is not None else None)
    assert got.shape == (hkv, n - lo) and got.dtype == torch.float32
    assert got_lse.shape == (hkv, g)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)
    assert (got[:, hi - lo:] == 0).all()


def test_nothing_in_range_gives_zero_shares():
    """hi <= lo: no position counts; lse is other_lse alone, or -inf without it."""
    q, basis, mean, keys, other = _inputs(2, 3, 32, 16, 40, torch.float32)
    dev = [t.to(DEVICE) for t in (q, basis, mean, keys)]
    shares, lse = select_scores(*dev, 4, torch.tensor([4], device=DEVICE), 0.2,
                                other.to(DEVICE))
    assert (shares == 0).all()
    torch.testing.assert_close(lse.cpu(), other)
    shares, lse = select_scores(*dev, 4, torch.tensor([2], device=DEVICE), 0.2)
    assert (shares == 0).all() and (lse == float("-inf")).all()


def test_reference_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, basis, mean, keys, other = _inputs(2, 3, 32, 16, 50, torch.float32)
    hi = torch.tensor([45])
    got = select_scores(q, basis, mean, keys, 4, hi, 0.2, other)
    want = select_scores_ref(q, basis, mean, keys, 4, hi, 0.2, other)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "basis_shape, mean_shape, keys_shape, other_shape",
    [
        pytest.param((2, 32, 16), (2, 32), (2, 50, 8), None, id="keys-rank"),
        pytest.param((2, 32, 16), (3, 32), (2, 50, 16), None, id="mean-heads"),
        pytest.param((2, 32, 16), (2, 32), (2, 50, 16), (2, 4), id="other-shape"),
    ],
)
def test_select_scores_rejects(basis_shape, mean_shape, keys_shape, other_shape):
    q = torch.zeros(2, 3, 32)
    other = torch.zeros(other_shape) if other_shape else None
    with pytest.raises(ValueError):
        select_scores(q, torch.zeros(basis_shape), torch.zeros(mean_shape),
                      torch.zeros(keys_shape), 4, torch.tensor([10]), 0.2, other)


def _same_topk_up_to_ties(got: torch.Tensor, want_scores: torch.Tensor, k: int,
                          rtol: float) -> None:
    """got's top-k per row is the reference's top-k, except where scores tie within rtol."""
    top = got.topk(k, dim=-1).indices
    kth = want_scores.topk(k, dim=-1).values[:, -1:]
    picked = want_scores.gather(1, top)
    assert (picked >= kth * (1 - rtol)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("n, bits, r, k", [
    pytest.param(131072, 16, 32, 8192, id="bf16-r32-128K"),
    pytest.param(1048576, 16, 32, 8192, id="bf16-r32-1M"),
    pytest.param(1048576, 8, 64, 4096, id="int8-r64-1M"),
    pytest.param(1048576, 4, 128, 4096, id="int4-r128-1M"),
])
def test_select_scores_qwen_7b_shape(n, bits, r, k):
    """Qwen2.5-7B shape (Hkv=4, G=7, D=128), n positions, the window's lse: a bf16 sketch of
    rank 32, or the 64 bytes per token of an int8 / int4 sketch, scored by int8 dots (exact)
    against the reference's float32 sums of the same integers; k: the candidates taken."""
    hkv, g, d, lo = 4, 7, 128, 4
    dtype = torch.bfloat16 if bits == 16 else torch.float32
    q, basis, mean, keys, other = _inputs(hkv, g, d, r, n, dtype, device="cuda")
    if bits < 16:
        keys = _quantised(3 * keys, bits)
    hi = torch.tensor([n - 600], device="cuda")
    want, want_lse = select_scores_ref(q, basis, mean, keys, lo, hi, d**-0.5, other)
    got, got_lse = select_scores(q, basis, mean, keys, lo, hi, d**-0.5, other)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    _same_topk_up_to_ties(got, want, k, rtol=1e-4)
    got16, _ = select_scores(q, basis, mean, keys, lo, hi, d**-0.5, other,
                             shares_dtype=torch.bfloat16)  # what re-ranking selects from
    torch.testing.assert_close(got16.float(), want, rtol=2**-8, atol=1e-9)
    _same_topk_up_to_ties(got16.float(), want, k, rtol=2**-7)


def test_bfloat16_shares_are_the_float32_shares_rounded():
    """shares_dtype bfloat16 (re-rank candidates): the float32 shares rounded once, the
    same lse, and a top-k that differs only among near-ties."""
    q, basis, mean, keys, other = _inputs(2, 7, 64, 32, 900, torch.bfloat16)
    hi = torch.tensor([850])
    want, want_lse = select_scores_ref(q, basis, mean, keys, 4, hi, 0.125, other)
    dev = [t.to(DEVICE) for t in (q, basis, mean, keys)]
    got, got_lse = select_scores(*dev, 4, hi.to(DEVICE), 0.125, other.to(DEVICE),
                                 shares_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # one bfloat16 ulp: the GPU rounds to nearest, Triton's CPU interpreter truncates
    torch.testing.assert_close(got.cpu().float(), want, rtol=2**-7, atol=1e-9)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)
    _same_topk_up_to_ties(got.cpu().float(), want, 64, rtol=2**-7)
    with pytest.raises(ValueError, match="shares_dtype"):
        select_scores(*dev, 4, hi.to(DEVICE), 0.125, shares_dtype=torch.float16)


@pytest.mark.parametrize("lo, hi, n", [(4, 250, 300), (0, 700, 700), (300, 517, 517)])
def test_chunk_mass_matches_reference(lo, hi, n):
    q, basis, mean, keys, other = _inputs(2, 3, 32, 16, n, torch.float32)
    hi_t = torch.tensor([hi])
    want = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=64)
    got = select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                        0.2, other.to(DEVICE), chunk=64)
    assert got[2].shape == (2, 3, -(-n // 64))
    for w, g_ in zip(want, got, strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    # each head's chunk masses add up to its probability mass in [lo, hi)
    logits = (q @ basis @ keys[:, lo:hi].transpose(1, 2) + (q @ mean[..., None])) * 0.2
    total = torch.exp(logits - want[1][..., None]).sum(-1)
    torch.testing.assert_close(want[2].sum(-1), total, rtol=1e-5, atol=1e-7)


def _quantised(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """keys [Hkv, N, r] float -> int8 (bits 8) or packed int4 uint8 (bits 4), unit scale."""
    top = 2 ** (bits - 1) - 1
    ints = keys.round().clamp(-top, top).to(torch.int8)
    return ints if bits == 8 else pack_int4(ints)


def test_int4_packing_round_trips():
    values = torch.randint(-7, 8, (3, 5, 16), dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 8)
    assert torch.equal(unpack_int4(packed), values)
    assert torch.equal(sketch_values(packed), values.float())
    with pytest.raises(ValueError, match="even"):
        pack_int4(values[..., :3])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("lo, hi, n, chunk", [(4, 250, 300, 64), (0, 517, 517, 0)])
def test_quantised_sketch_matches_reference(bits, lo, hi, n, chunk):
    """int8 and packed-int4 keys: the kernel scores the same integers against the same int8
    query as the reference (int8 dots on a GPU, exact); shares, lse and chunk masses agree."""
    # int8 dots need >= 32 columns: rank 64 (int4: two halves of 32)
    q, basis, mean, keys, other = _inputs(2, 7, 32, 64, n, torch.float32)
    keys = _quantised(3 * keys, bits)
    hi_t = torch.tensor([hi])
    want = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=chunk)
    got = select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                        0.2, other.to(DEVICE), chunk=chunk)
    for w, g_ in zip(want, got, strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    # the reference scores the integers themselves, against an int8 q @ basis
    ints = keys.float() if bits == 8 else unpack_int4(keys).float()
    qi, step = quantize_query(q @ basis)
    assert ((qi.float() * step[:, None, None] - q @ basis).abs()
            <= step[:, None, None] / 2 + 1e-6).all()
    logits = (qi.float() @ ints[:, lo:hi].transpose(1, 2) * step[:, None, None]
              + q @ mean[..., None]) * 0.2
    torch.testing.assert_close(want[1], torch.logaddexp(logits.logsumexp(-1), other))


def test_quantised_sketch_rejects_bad_layouts():
    q, basis, mean, keys, _ = _inputs(2, 3, 32, 16, 50, torch.float32)
    hi = torch.tensor([40])
    with pytest.raises(ValueError, match="packed int4"):  # uint8 must be [Hkv, N, r / 2]
        select_scores(q, basis, mean, keys.to(torch.uint8), 4, hi, 0.2)
    with pytest.raises(ValueError, match="dtype"):
        select_scores(q, basis, mean, keys.to(torch.int16), 4, hi, 0.2)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("lo, hi, n", [(4, 250, 300), (300, 517, 517)])
def test_one_pass_matches_reference(bits, lo, hi, n):
    """lse_state: the kernel normalises shares and chunk masses by the state's lse
    log-added to other_lse, and leaves this call's exact region lse in the state, as the
    reference does; a repeat of the same step reads what the first run read."""
    q, basis, mean, keys, other = _inputs(2, 7, 32, 64, n, torch.float32)
    if bits == 8:
        keys = _quantised(3 * keys, bits)
    dev = [t.to(DEVICE) for t in (q, basis, mean, keys)]
    before = torch.randn(2, 7) + 2
    before[1, 3] = float("-inf")  # no previous step: other_lse alone
    hi_t = torch.tensor([hi])
    want_state, got_state = LseState.empty(2, 7, "cpu"), LseState.empty(2, 7, DEVICE)
    for state in (want_state, got_state):
        state.lse[1].copy_(before)
        state.hi.fill_(hi - 1)  # the previous step
    want = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=64,
                             lse_state=want_state)
    got = select_scores(*dev, lo, hi_t.to(DEVICE), 0.2, other.to(DEVICE), chunk=64,
                        lse_state=got_state)
    for w, g_ in zip(want, got, strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got[1].cpu(), torch.logaddexp(before, other))
    exact = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=64)
    region = exact[1] + torch.log1p(-torch.exp(other - exact[1]))  # exact lse less other's
    for state in (want_state, got_state):
        torch.testing.assert_close(state.lse[0].cpu(), before)
        torch.testing.assert_close(state.lse[1].cpu(), region, rtol=1e-4, atol=1e-4)
        assert state.hi.tolist() == [hi, hi]  # each of the 2 kv heads
    # the same step again (a graph's warm-up, then capture): the same normaliser
    again = select_scores(*dev, lo, hi_t.to(DEVICE), 0.2, other.to(DEVICE), chunk=64,
                          lse_state=got_state)
    for w, g_ in zip(want, again, strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    # the next step reads this one's exact region lse
    nxt = select_scores(*dev, lo, (hi_t + 1).to(DEVICE), 0.2, other.to(DEVICE), chunk=64,
                        lse_state=got_state)
    want_next = select_scores_ref(q, basis, mean, keys, lo, hi_t + 1, 0.2, other, chunk=64)
    region_next = want_next[1] + torch.log1p(-torch.exp(other - want_next[1]))
    torch.testing.assert_close(nxt[1].cpu(), torch.logaddexp(region, other), rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(got_state.lse[1].cpu(), region_next, rtol=1e-4, atol=1e-4)


def test_one_pass_state_survives_scores_far_above_its_frame():
    """A first step whose region scores exceed the window's lse by more than float32's
    exp range: its shares overflow (as the reference's do), but the state it leaves is
    the largest score, within log(N) of the exact region lse, so the next step is sane."""
    q, basis, mean, keys, other = _inputs(2, 7, 32, 64, 300, torch.float32)
    dev = [t.to(DEVICE) for t in (q, basis, mean, keys)]
    far = (other - 300).to(DEVICE)  # the window's lse, ~300 below the region's
    state = LseState.empty(2, 7, DEVICE)
    shares = select_scores(*dev, 4, torch.tensor([250], device=DEVICE), 0.2, far,
                           lse_state=state)[0]
    assert torch.isinf(shares).any()
    exact = select_scores_ref(q, basis, mean, keys, 4, torch.tensor([250]), 0.2)[1]
    got = state.lse[1].cpu()
    assert (got <= exact + 1e-4).all() and (exact <= got + torch.log(torch.tensor(246.0))).all()
    nxt = select_scores(*dev, 4, torch.tensor([251], device=DEVICE), 0.2, far,
                        lse_state=state)[0]
    assert torch.isfinite(nxt).all() and nxt.sum() > 0


def test_one_pass_rejects_a_state_without_other_lse_or_of_the_wrong_shape():
    q, basis, mean, keys, other = _inputs(2, 3, 32, 16, 40, torch.float32)
    dev = [t.to(DEVICE) for t in (q, basis, mean, keys)]
    hi = torch.tensor([30], device=DEVICE)
    with pytest.raises(ValueError, match="lse_state"):
        select_scores(*dev, 4, hi, 0.2, lse_state=LseState.empty(2, 3, DEVICE))
    with pytest.raises(ValueError, match="lse_state"):
        select_scores(*dev, 4, hi, 0.2, other.to(DEVICE), lse_state=LseState.empty(2, 4, DEVICE))


@pytest.mark.parametrize("block, lo, hi, n, one_pass", [
    (4, 4, 250, 300, False), (4, 4, 517, 517, True), (64, 0, 700, 700, True),
    (8, 4, 250, 300, True),  # lo not a multiple of the block: shares summed after
    (3, 6, 250, 300, True),  # nor a divisor of the kernel's tile
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sums_match_reference(block, lo, hi, n, one_pass, dtype):
    """block P: the kernel writes the shares' sums per aligned block of P positions from
    lo (-1 where a block is not wholly before hi), never the shares themselves; summed in
    float32, rounded to the shares' dtype."""
    q, basis, mean, keys, other = _inputs(2, 7, 32, 64, n, torch.float32)
    keys = _quantised(3 * keys, 8)
    hi_t = torch.tensor([hi])
    want_state, got_state = LseState.empty(2, 7, "cpu"), LseState.empty(2, 7, DEVICE)
    want = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=64,
                             lse_state=want_state if one_pass else None, block=block)
    got = select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                        0.2, other.to(DEVICE), chunk=64, shares_dtype=dtype,
                        lse_state=got_state if one_pass else None, block=block)
    assert got[0].shape == (2, (n - lo) // block) and got[0].dtype == dtype
    # bfloat16: float32 sums that agree to 1e-4 round to the same bfloat16 or a neighbour
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(got[0].cpu(), want[0].to(dtype), **tol)
    for w, g_ in zip(want[1:], got[1:], strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    shares = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other,
                               lse_state=LseState.empty(2, 7, "cpu") if one_pass else None)[0]
    whole = (hi - lo) // block
    torch.testing.assert_close(
        want[0][:, :whole], shares[:, :whole * block].view(2, whole, block).sum(-1))
    assert (want[0][:, whole:] == -1).all()
    with pytest.raises(ValueError, match="block"):
        select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                      0.2, block=0)


@pytest.mark.parametrize("g", [4, 7, 16])  # 4, 2 and 1 tiles of positions a dot
@pytest.mark.parametrize("bits, block, one_pass", [(8, 4, True), (4, 1, False), (16, 1, True)])
def test_tiles_inside_and_at_the_edges_match_reference(g, bits, block, one_pass):
    """Steps wholly inside [lo, hi) (scored with no mask) and steps across lo or hi, with
    each head's rows spread over several tiles of positions: shares (or block sums), lse,
    chunk masses and the one-pass state as the reference's."""
    n, lo, hi = 2300, 4, 1800  # the step at 1536 crosses hi in its third tile
    q, basis, mean, keys, other = _inputs(2, g, 32, 64, n, torch.float32, seed=g)
    if bits < 16:
        keys = _quantised(3 * keys, bits)
    hi_t = torch.tensor([hi])
    states = [LseState.empty(2, g, d) if one_pass else None for d in ("cpu", DEVICE)]
    want = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=64,
                             lse_state=states[0], block=block)
    got = select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                        0.2, other.to(DEVICE), chunk=64, lse_state=states[1], block=block)
    for w, g_ in zip(want, got, strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    if one_pass:
        torch.testing.assert_close(states[1].lse.cpu(), states[0].lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("g, one_pass, sums_dtype", [
    (4, True, torch.float32), (7, False, torch.float32), (4, True, torch.bfloat16)])
def test_tail_sums_give_the_chunk_term_of_the_mass(g, one_pass, sums_dtype):
    """tail_sums: the pass returns, instead of the chunk masses, their partial sums against
    the V chunk sums (sum_c mass_gc · sums_c / chunk) and of the masses themselves, which
    add up to what the reference's masses give; shares and lse unchanged. bfloat16 sums
    (offload/tail.py's for 16-bit models) are read as float32."""
    from retrieval_attn.kernels.formats import ChunkTail

    n, lo, hi = 2300, 4, 1800
    q, basis, mean, keys, other = _inputs(2, g, 32, 64, n, torch.float32, seed=g)
    keys = _quantised(3 * keys, 8)
    sums = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(5))  # M >= 36
    sums = sums.to(sums_dtype)
    hi_t = torch.tensor([hi])
    states = [LseState.empty(2, g, d) if one_pass else None for d in ("cpu", DEVICE)]
    want = select_scores_ref(q, basis, mean, keys, lo, hi_t, 0.2, other, chunk=64,
                             lse_state=states[0], block=4)
    got = select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                        0.2, other.to(DEVICE), chunk=64, lse_state=states[1], block=4,
                        tail_sums=sums.to(DEVICE))
    assert isinstance(got[2], ChunkTail)
    for w, g_ in zip(want[:2], got[:2], strict=True):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-7)
    mass = want[2]  # [2, G, 36]
    term = got[2].part_t.sum(1)[:, :g].cpu()  # over the splits, the real heads
    torch.testing.assert_close(term, (mass / 64) @ sums[:, :36].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2].part_m.sum(1)[:, :g].cpu(), mass.sum(-1), rtol=1e-4,
                               atol=1e-7)
    with pytest.raises(ValueError, match="tail_sums"):  # needs the chunk masses' chunk
        select_scores(*(t.to(DEVICE) for t in (q, basis, mean, keys)), lo, hi_t.to(DEVICE),
                      0.2, other.to(DEVICE), tail_sums=sums.to(DEVICE))


def test_a_share_of_the_sms_splits_the_pass_fewer_ways_to_the_same_result():
    """sm_share sizes the grid for that share of the SMs (kv.lookahead_sm_share): fewer
    splits of the positions, the same shares, lse, state and chunk term."""
    from retrieval_attn.kernels.formats import ChunkTail

    # enough positions that a GPU's full grid has more splits than half of it has
    n = 40000 if DEVICE == "cuda" else 2300
    lo, hi = 4, n - 500
    q, basis, mean, keys, other = _inputs(2, 4, 32, 64, n, torch.float32, seed=3)
    keys = _quantised(3 * keys, 8)
    sums = torch.randn(2, -(-n // 64), 16, generator=torch.Generator().manual_seed(5))
    args = [t.to(DEVICE) for t in (q, basis, mean, keys)]
    hi_t = torch.tensor([hi], device=DEVICE)
    got = {}
    for share in (1.0, 0.5):
        state = LseState.empty(2, 4, DEVICE)
        got[share] = select_scores(*args, lo, hi_t, 0.2, other.to(DEVICE), chunk=64,
                                   lse_state=state, block=4, tail_sums=sums.to(DEVICE),
                                   sm_share=share) + (state.lse,)
    full, half = got[1.0], got[0.5]
    assert isinstance(half[2], ChunkTail)
    assert half[2].part_m.shape[1] < full[2].part_m.shape[1]  # fewer programs a kv head
    for a, b in ((full[0], half[0]), (full[1], half[1]), (full[3], half[3])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in ((full[2].part_t, half[2].part_t), (full[2].part_m, half[2].part_m)):
        torch.testing.assert_close(b.sum(1), a.sum(1), rtol=1e-4, atol=1e-7)  # sum order
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="sm_share"):
            select_scores(*args, lo, hi_t, 0.2, sm_share=bad)
