"""guess_query against guess_query_ref (float32 both, summed in another order), and the
int8 guess against the same guess in float32 weights: RMSNorm, projection, RoPE."""

import pytest
import torch

from retrieval_attn.kernels.guess_query import GuessWeights, guess_query, guess_query_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(h, d, c, bias, gen, dtype=torch.float32):
    weight = (torch.randn(h * d, c, generator=gen) * c**-0.5).to(dtype)
    norm = (1 + 0.3 * torch.randn(c, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(h * d, generator=gen)).to(dtype) if bias else None
    angles = torch.rand(d // 2, generator=gen) * 6.3
    emb = torch.cat([angles, angles])
    return weight, norm, b, emb.cos().to(dtype), emb.sin().to(dtype)


def _float_guess(x, weight, norm, bias, cos, sin, eps, h):
    """The model's guess in float32 with the unrounded weights."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    q = normed @ weight.float().t() + (0 if bias is None else bias.float())
    q = q.view(x.shape[0], h, -1)
    half = q.shape[-1] // 2
    return q * cos.float() + torch.cat([-q[..., half:], q[..., :half]], -1) * sin.float()


@pytest.mark.parametrize("b, h, d, c, bias", [
    pytest.param(1, 9, 64, 576, False, id="smollm2"),
    pytest.param(2, 4, 32, 200, True, id="bias-ragged-c"),
])
def test_guess_query_matches_reference(b, h, d, c, bias):
    gen = torch.Generator().manual_seed(0)
    weight, norm, bias_t, cos, sin = _layer(h, d, c, bias, gen)
    w = GuessWeights.of(weight, norm, bias_t, 1e-5, h)
    x = torch.randn(b, c, generator=gen)
    got = guess_query(x.to(DEVICE), GuessWeights(*(t.to(DEVICE) if torch.is_tensor(t) else t
                                                     for t in w)),
                      cos.to(DEVICE), sin.to(DEVICE))
    assert got.shape == (b, h, d) and got.dtype == x.dtype
    want = guess_query_ref(x, w.rows, w.scale, w.bias, cos, sin, w.eps, h)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_int8_guess_is_close_to_the_float_guess():
    """Rows rounded to int8 by their largest magnitude: each query within 2% (relative
    norm) of the unrounded projection's (~1.2% here: a step of ~3σ/127 per weight)."""
    gen = torch.Generator().manual_seed(1)
    h, d, c = 9, 64, 576
    weight, norm, bias, cos, sin = _layer(h, d, c, True, gen)
    x = 3 * torch.randn(4, c, generator=gen)
    w = GuessWeights.of(weight, norm, bias, 1e-5, h)
    got = guess_query_ref(x, w.rows, w.scale, w.bias, cos, sin, w.eps, h)
    want = _float_guess(x, weight, norm, bias, cos, sin, 1e-5, h)
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.max() < 0.02, err.max()
    assert w.rows.dtype == torch.int8 and w.nbytes() == h * d * (c + 4 + 4)


def test_guess_query_refuses_shapes_that_do_not_fit():
    gen = torch.Generator().manual_seed(2)
    weight, norm, _, cos, sin = _layer(2, 16, 32, False, gen)
    w = GuessWeights.of(weight, norm, None, 1e-5, 2)
    with pytest.raises(ValueError, match="do not fit"):
        guess_query(torch.randn(1, 31), w, cos, sin)
    with pytest.raises(ValueError, match="do not fit"):
        guess_query(torch.randn(1, 32), w, cos[:8], sin)


@pytest.mark.gpu
@pytest.mark.parametrize("h, c, bias", [pytest.param(32, 4096, False, id="llama-3-8b"),
                                        pytest.param(28, 3584, True, id="qwen2.5-7b")])
def test_guess_query_real_shapes_on_gpu(h, c, bias):
    gen = torch.Generator().manual_seed(3)
    weight, norm, bias_t, cos, sin = _layer(h, 128, c, bias, gen, torch.bfloat16)
    w = GuessWeights.of(weight.cuda(), norm.cuda(), None if bias_t is None else bias_t.cuda(),
                        1e-5, h)
    x = torch.randn(1, c, generator=gen).bfloat16().cuda()
    got = guess_query(x, w, cos.cuda(), sin.cuda())
    want = guess_query_ref(x, w.rows, w.scale, w.bias, cos.cuda(), sin.cuda(), w.eps, h)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
    bias_gpu = None if bias_t is None else bias_t.cuda()
    err = (got.float() - _float_guess(x, weight.cuda(), norm.cuda(), bias_gpu, cos.cuda(),
                                      sin.cuda(), 1e-5, h)).norm(dim=-1)
    assert (err / got.float().norm(dim=-1)).max() < 0.02
