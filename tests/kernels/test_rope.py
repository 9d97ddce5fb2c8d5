"""rope against rope_ref: float32 both; the reference rounds each product to the dtype, the
kernel only the result, so half-precision results agree to a step or two of the dtype
(Triton's CPU interpreter truncates where the GPU rounds to nearest: a step more)."""

import pytest
import torch

from retrieval_attn.kernels.rope import rope, rope_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(t, d, dtype, gen):
    angles = torch.rand(t, d // 2, generator=gen) * 6.3
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("b, h, t, d, dtype", [
    pytest.param(1, 9, 1, 64, torch.float32, id="decode-fp32"),
    pytest.param(2, 3, 5, 64, torch.bfloat16, id="prefill-bf16"),
    pytest.param(1, 4, 3, 128, torch.float16, id="d128-fp16"),
])
def test_rope_matches_reference_exactly(b, h, t, d, dtype):
    gen = torch.Generator().manual_seed(1)
    # as the model hands it over: a [B, T, H, D] buffer seen as [B, H, T, D]
    x = torch.randn(b, t, h, d, generator=gen).to(dtype).transpose(1, 2)
    cos, sin = _tables(t, d, dtype, gen)
    got = rope(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    assert got.shape == (b, h, t, d) and got.is_contiguous()
    _close(got.cpu(), rope_ref(x, cos, sin), dtype)


def _close(got, want, dtype):
    step = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got, want, rtol=3 * step, atol=3 * step)


def test_rope_odd_half_falls_back_and_bad_tables_are_refused():
    x = torch.randn(1, 2, 3, 12)  # half 6: not a power of two, the reference runs
    cos, sin = _tables(3, 12, torch.float32, torch.Generator().manual_seed(2))
    assert torch.equal(rope(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE)).cpu(),
                       rope_ref(x, cos, sin))
    with pytest.raises(ValueError, match="cos"):
        rope(x, cos[:2], sin)


@pytest.mark.gpu
def test_rope_prefill_chunk_on_gpu():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2048, 28, 128, generator=gen).bfloat16().cuda().transpose(1, 2)
    cos, sin = (t.cuda() for t in _tables(2048, 128, torch.bfloat16, gen))
    _close(rope(x, cos, sin), rope_ref(x, cos, sin), torch.bfloat16)
