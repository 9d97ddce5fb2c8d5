"""LowRankKeys' quantised sketches (int8, packed int4) against the float sketch of the same
rank and against exact q·k: error within half an integer step per dim, the same integers
by build and by append, the fused shares equal to the scores they stand for."""

import pytest
import torch

from retrieval_attn.kernels.formats import quantize_query, sketch_values, unpack_int4
from retrieval_attn.offload.lowrank import LowRankKeys

HKV, G, N, D = 2, 3, 300, 32
CPU = torch.device("cpu")


def _keys(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # anisotropic keys, as real ones are: a few dims carry most of the variance
    spread = torch.logspace(1, -1, D)
    return torch.randn(HKV, N, D, generator=gen) * spread + 0.5, torch.randn(
        HKV, G, D, generator=gen)


@pytest.mark.parametrize("sketch", ["int8", "int4"])
def test_quantised_scores_are_the_float_sketch_within_half_a_step(sketch):
    k, q = _keys()
    exact = LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32)
    exact.build(0, k)
    quant = LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32, sketch)
    quant.build(0, k)
    assert quant.keys.dtype == (torch.int8 if sketch == "int8" else torch.uint8)
    assert quant.keys.shape[-1] == (16 if sketch == "int8" else 8)
    torch.testing.assert_close(quant.basis, exact.basis)
    want, got = exact.scores(0, q, 0, N), quant.scores(0, q, 0, N)
    # each key dim is off by at most half its step, and so is each dim of the int8 query:
    # |error| <= sum_d |q·basis_d| · scale_d / 2 + query step / 2 · sum_d |key_d|
    qr = q @ exact.basis[0]  # [Hkv, G, r]
    keys = sketch_values(quant.keys[0]) * quant.scale[0, :, None, :]  # [Hkv, N, r]
    _, step = quantize_query(qr * quant.scale[0, :, None, :])
    bound = ((qr.abs() * quant.scale[0, :, None, :]).sum(-1, keepdim=True) / 2
             + step[:, None, None] / 2 * (keys / quant.scale[0, :, None, :]).abs().sum(-1)[
                 :, None, :])
    assert ((got - want).abs() <= bound + 1e-4).all()
    assert (got - want).abs().max() > 0  # it is quantised
    at = torch.tensor([[5, 17, 299]] * HKV)
    torch.testing.assert_close(quant.scores_at(0, quant.query(0, q), at),
                               got.gather(2, at[:, None].expand(-1, G, -1)), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sketch", ["int8", "int4"])
def test_append_stores_the_integers_build_stores(sketch, dtype):
    """Also for a bfloat16 model with keys far from 0, where a mean rounded to bfloat16
    would shift every decode token's integers."""
    k, _ = _keys(1)
    k = (k + 20).to(dtype)
    a = LowRankKeys(1, HKV, N, D, 16, CPU, dtype, sketch)
    a.build(0, k)
    b = LowRankKeys(1, HKV, N, D, 16, CPU, dtype, sketch)
    b.build(0, k[:, :100])
    for name in ("basis", "mean", "scale"):  # the fit of the whole prompt
        getattr(b, name).copy_(getattr(a, name))
    for pos in range(100, N):
        b.append(0, torch.tensor([pos]), k[:, pos:pos + 1])
    ints = (lambda x: x) if sketch == "int8" else unpack_int4
    # float32 rounding of the projection may move a value sitting on a .5 by one step
    assert (ints(a.keys[:, :, 100:]).int() - ints(b.keys[:, :, 100:]).int()).abs().max() <= 1


def test_a_token_beyond_the_prompts_range_saturates():
    k, _ = _keys(2)
    s = LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32, "int4")
    s.build(0, k)
    far = (s.mean[0] + 100 * s.basis[0, :, :, 0])[:, None]  # [Hkv, 1, D], far out on dim 0
    s.append(0, torch.tensor([N - 1]), far)
    assert (unpack_int4(s.keys[0, :, N - 1])[:, 0] == 7).all()


@pytest.mark.parametrize("sketch", ["int8", "int4"])
def test_fused_shares_match_the_scores_they_stand_for(sketch):
    k, q = _keys(3)
    s = LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32, sketch)
    s.build(0, k)
    hi, scale = torch.tensor([N - 20]), D**-0.5
    other = torch.randn(HKV, G)
    shares, lse = s.shares(0, q, 4, hi, scale, other)
    logits = s.scores(0, q, 4, N - 20) * scale
    want_lse = torch.logaddexp(logits.logsumexp(-1), other)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    want = torch.exp(logits - want_lse[..., None]).sum(1)
    torch.testing.assert_close(shares[:, :N - 24], want, rtol=1e-4, atol=1e-7)
    assert (shares[:, N - 24:] == 0).all()


def test_sketch_bytes_int4_rank_4r_equals_bfloat16_rank_r():
    bf16 = LowRankKeys(2, HKV, N, D, 8, CPU, torch.bfloat16)
    int4 = LowRankKeys(2, HKV, N, D, 32, CPU, torch.bfloat16, "int4")
    assert bf16.keys.numel() * 2 == int4.keys.numel() * 1  # the [L, Hkv, N, .] part
    assert int4.memory_bytes()["host"] > int4.keys.numel()  # + float32 basis and scales


def test_bad_sketch_arguments_are_refused():
    with pytest.raises(ValueError, match="even"):
        LowRankKeys(1, HKV, N, D, 15, CPU, torch.float32, "int4")
    with pytest.raises(ValueError, match="int4"):
        LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32, "fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("sketch, rank", [("int8", 64), ("int4", 128)])
def test_kernel_shares_of_a_quantised_sketch_match_its_scores(sketch, rank):
    """On the GPU `shares` runs kernels.select_scores with the scales folded into the
    basis: it must agree with the sketch's own scores (what the tail estimate uses)."""
    gen = torch.Generator().manual_seed(4)
    n, d, g = 70000, 128, 7
    k = (torch.randn(4, n, d, generator=gen) * torch.logspace(0.5, -1, d) + 3).cuda()
    q = torch.randn(4, g, d, generator=gen).cuda()
    s = LowRankKeys(1, 4, n, d, rank, torch.device("cuda"), torch.bfloat16, sketch)
    s.build(0, k.bfloat16())
    hi, scale, other = torch.tensor([n - 600], device="cuda"), d**-0.5, torch.zeros(4, g,
                                                                                    device="cuda")
    shares, lse = s.shares(0, q.bfloat16(), 4, hi, scale, other)
    logits = s.scores_at(0, s.query(0, q.bfloat16()),
                         torch.arange(4, n - 600, device="cuda").expand(4, -1))
    want_lse = torch.logaddexp((logits * scale).logsumexp(-1), other)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)
    want = torch.exp(logits * scale - want_lse[..., None]).sum(1)
    torch.testing.assert_close(shares[:, :n - 604], want, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("sketch", ["auto", "int8", "int4"])
def test_state_round_trips_a_prompts_sketch(sketch):
    """state(n) is what a saved context keeps (the first n positions' keys, the scale only
    for integer sketches); load_state puts it back into a sketch that never saw the keys:
    the same scores."""
    k, q = _keys()
    n = 250
    built = LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32, sketch)
    built.build(0, k[:, :n])
    state = built.state(n)
    assert state["keys"].shape[2] == n and ("scale" in state) == (sketch != "auto")
    loaded = LowRankKeys(1, HKV, N, D, 16, CPU, torch.float32, sketch)
    loaded.load_state(state)
    assert torch.equal(loaded.scores(0, q, 0, n), built.scores(0, q, 0, n))
