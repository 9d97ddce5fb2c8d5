"""tail_correct against tail_correct_ref: the tail estimate's merge into a decode step."""

import pytest
import torch

from retrieval_attn.kernels.tail_correct import tail_correct, tail_correct_ref
from retrieval_attn.offload.tail import CHUNK, padded_chunks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(r, g, d, n, k, count, pos, dtype=torch.float32, device="cpu", seed=0):
    """Consistent inputs: each chunk's sketch mass holds at least the selected tokens' own
    mass in it (as the sketch's scores make it), so the reference clamps nothing."""
    gen = torch.Generator().manual_seed(seed)
    mm, scale = -(-n // CHUNK), d**-0.5
    selected = torch.stack([torch.randperm(pos - 600, generator=gen)[:k] + 4
                            for _ in range(r)])  # [R, K] distinct, in the region
    scores = torch.randn(r, g, k, generator=gen) * 3
    total = torch.randn(r, g, generator=gen) + 9
    real = torch.arange(k) < count
    p_sel = torch.exp(scores * scale - total[..., None]) * real
    mass = torch.rand(r, g, mm, generator=gen) * 1e-3
    mass[:, :, (pos + 1) // CHUNK + 1:] = 0  # no mass past the context
    mass = mass.scatter_add(2, (selected // CHUNK)[:, None].expand(-1, g, -1), p_sel)
    sums = torch.zeros(r, padded_chunks(n), d)
    sums[:, :mm] = torch.randn(r, mm, d, generator=gen) * 8
    out = torch.randn(r, g, d, generator=gen).to(dtype)
    lse_att = torch.randn(r, g, generator=gen) + 9
    t = (out, lse_att, mass, total, selected, scores, torch.tensor([count]),
         torch.tensor([pos]), sums)
    return [x.to(device) for x in t], scale


@pytest.mark.parametrize("r, g, d, n, k, count, pos, dtype", [
    pytest.param(2, 3, 32, 1000, 40, 40, 990, torch.float32, id="g3-full"),
    pytest.param(1, 7, 64, 3000, 100, 70, 2900, torch.bfloat16, id="g7-count<k-bf16"),
    pytest.param(3, 4, 16, 5000, 130, 130, 4100, torch.float32, id="many-splits"),
])
def test_tail_correct_matches_reference(r, g, d, n, k, count, pos, dtype):
    args, scale = _inputs(r, g, d, n, k, count, pos, dtype)
    want = tail_correct_ref(*args, scale, CHUNK)
    got = tail_correct(*(a.to(DEVICE) for a in args), scale, CHUNK)
    assert got.shape == (r, g, d) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    assert not torch.allclose(want.float(), args[0].float(), atol=1e-3)  # a real change


def test_bfloat16_sums_are_read_as_float32():
    """offload/tail.py keeps a 16-bit model's chunk sums in bfloat16: the kernels read them
    as float32, the same as the reference given them."""
    args, scale = _inputs(2, 4, 32, 3000, 60, 60, 2900, torch.bfloat16, seed=3)
    args[-1] = args[-1].bfloat16()
    want = tail_correct_ref(*args, scale, CHUNK)
    got = tail_correct(*(a.to(DEVICE) for a in args), scale, CHUNK)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
    exact = tail_correct_ref(*args[:-1], args[-1].float(), scale, CHUNK)
    assert torch.equal(want, exact)  # the reference upcasts: the same as float32 sums


@pytest.mark.parametrize("tile", [2, 4])
def test_the_merge_reads_its_partials_in_any_number_of_steps(monkeypatch, tile):
    """tail_merge sums the partials MERGE_TILE at a time: in tiles of 2 and 4 (several
    steps, the last one partly past the end: 3 selected-token partials here), the sums
    are the reference's."""
    import importlib

    tc = importlib.import_module("retrieval_attn.kernels.tail_correct")
    monkeypatch.setattr(tc, "MERGE_TILE", tile)
    k = 2 * tc.BLOCK + 2  # selected tokens: 3 partials
    args, scale = _inputs(3, 4, 16, 5000, k, k, 4100)
    want = tail_correct_ref(*args, scale, CHUNK)
    got = tail_correct(*(a.to(DEVICE) for a in args), scale, CHUNK)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_no_tail_mass_leaves_the_output_alone():
    args, scale = _inputs(2, 3, 32, 1000, 40, 40, 990)
    out, lse_att, mass, total, selected, scores, count, pos, sums = args
    p_sel = torch.exp(scores * scale - total[..., None])
    mass = torch.zeros_like(mass).scatter_add(  # only what the selection attends anyway
        2, (selected // CHUNK)[:, None].expand(-1, 3, -1), p_sel)
    got = tail_correct(*(a.to(DEVICE) for a in (out, lse_att, mass, total, selected, scores,
                                                 count, pos, sums)), scale, CHUNK)
    torch.testing.assert_close(got.cpu(), out, rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused():
    args, scale = _inputs(2, 3, 32, 1000, 40, 40, 990)
    args[8] = args[8][:, :63]  # M not a multiple of SPLITS
    with pytest.raises(ValueError, match="tail_correct"):
        tail_correct(*args, scale, CHUNK)


@pytest.mark.gpu
def test_tail_correct_qwen_7b_shape_1m():
    """Qwen2.5-7B shape at 1M: 4 kv-head rows, G = 7, D = 128, 16K chunks, top_k 2048."""
    args, scale = _inputs(4, 7, 128, 1 << 20, 2048, 2048, (1 << 20) - 10, torch.bfloat16,
                          device="cuda")
    want = tail_correct_ref(*args, scale, CHUNK)
    got = tail_correct(*args, scale, CHUNK)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("count", [70, 0], ids=["count<k", "none-selected"])
def test_merge_with_a_guess_weighs_by_the_guess(count):
    """Lookahead: tail_merge with the guess's window lse weighs the exact part by the guess
    (window lse log-added to the selected tokens' sketch lse, taken from the partials), as
    the reference does with guess_lse_ref in place of lse_att."""
    from retrieval_attn.kernels.tail_correct import guess_lse_ref, tail_merge, tail_partials

    args, scale = _inputs(2, 7, 64, 3000, 100, count, 2900)
    out, lse_att, mass, total, selected, scores, cnt, pos, sums = args
    guess = torch.randn(2, 7, generator=torch.Generator().manual_seed(1)) + 8
    attended = guess_lse_ref(guess, scores, cnt, scale)
    want = tail_correct_ref(out, attended, mass, total, selected, scores, cnt, pos, sums,
                            scale, CHUNK)
    dev = [a.to(DEVICE) for a in args]
    parts = tail_partials(*dev[2:], scale, CHUNK)
    got = tail_merge(dev[0], torch.full_like(dev[1], float("nan")), parts, guess.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    if count == 0:  # nothing selected: the guess's window alone
        torch.testing.assert_close(attended, guess)
    else:
        assert (attended > guess + 1e-3).all()


@pytest.mark.parametrize("with_guess", [False, True])
def test_chunk_partials_made_elsewhere_merge_as_the_reference(with_guess):
    """tail_partials given the chunk term already summed (select_scores' tail_sums, which
    takes every chunk with mass as full) launches only the selected tokens' part; merged,
    the same as the reference."""
    from retrieval_attn.kernels.formats import ChunkTail
    from retrieval_attn.kernels.tail_correct import (
        chunk_tail_ref,
        guess_lse_ref,
        tail_merge,
        tail_partials,
    )

    args, scale = _inputs(2, 7, 64, 3000, 100, 70, 2900)
    out, lse_att, mass, total, selected, scores, cnt, pos, sums = args
    mass[:, :, 2900 // CHUNK:] = 0  # no mass in the chunk being filled (the window's)
    guess = torch.randn(2, 7, generator=torch.Generator().manual_seed(1)) + 8
    attended = guess_lse_ref(guess, scores, cnt, scale) if with_guess else lse_att
    want = tail_correct_ref(out, attended, mass, total, selected, scores, cnt, pos, sums,
                            scale, CHUNK)
    chunks = ChunkTail(*(t.to(DEVICE) for t in chunk_tail_ref(mass, sums, CHUNK)))
    dev = [a.to(DEVICE) for a in args]
    parts = tail_partials(chunks, *dev[3:], scale, CHUNK)
    from retrieval_attn.kernels.tail_correct import BLOCK

    assert parts.chunks is chunks and parts.picked.part_t.shape[1] == -(-100 // BLOCK)
    got = tail_merge(dev[0], dev[1], parts, guess.to(DEVICE) if with_guess else None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_lse_far_apart_merge_in_the_log_domain():
    """Qwen2's heads score keys in the hundreds, and a one-pass total lse is the previous
    step's: total_lse - lse_att can pass float32's exp range (~88). The merge must stay
    finite and equal the exact formula's limit: a head with no tail mass keeps its exact
    output, a head whose tail outweighs it by e^100 takes the tail's mean, a head where
    both are comparable matches (out + r·tail) / (1 + r·mass) in float64."""
    args, scale = _inputs(1, 3, 32, 1000, 40, 40, 990)
    out, lse_att, mass, total = args[0], args[1], args[2], args[3]
    total[0] = lse_att[0] + torch.tensor([105.0, 100.0, 1.0])
    mass[0, 0] = 0.0  # head 0: every chunk underflowed against a too-high total
    args[5][0, 0] = -1e4  # and its selected tokens' sketch mass is nil too
    want = tail_correct_ref(*args, scale, CHUNK)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(want[0, 0], out[0, 0])
    got = tail_correct(*(a.to(DEVICE) for a in args), scale, CHUNK)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_merge_tail_is_the_plain_formula_where_it_is_representable():
    """merge_tail = (out + r·tail) / (1 + r·mass), r = exp(total - lse_att), wherever
    float64 computes that plainly."""
    from retrieval_attn.kernels.tail_correct.ref import merge_tail

    gen = torch.Generator().manual_seed(1)
    out, tail = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    mass = torch.rand(2, 3, generator=gen) * 2
    lse_att = torch.randn(2, 3, generator=gen) * 5
    total = lse_att + torch.randn(2, 3, generator=gen) * 5
    r = torch.exp(total.double() - lse_att.double())[..., None]
    plain = (out.double() + r * tail.double()) / (1 + r * mass.double()[..., None])
    torch.testing.assert_close(merge_tail(out, lse_att, total, tail, mass), plain.float(),
                               rtol=1e-5, atol=1e-5)


def test_non_finite_tail_mass_adds_nothing():
    """Sketch masses past float32's range (a one-pass lse far below this step's scores)
    must not turn the output into NaN: that head keeps its exact part."""
    args, scale = _inputs(1, 2, 32, 1000, 40, 40, 990)
    args[2][0, 1, 3] = float("inf")
    want = tail_correct_ref(*args, scale, CHUNK)
    torch.testing.assert_close(want[0, 1], args[0][0, 1])
    got = tail_correct(*(a.to(DEVICE) for a in args), scale, CHUNK)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
