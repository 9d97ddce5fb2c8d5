"""rms_norm against rms_norm_ref: float32 arithmetic in both, the sum's order apart."""

import pytest
import torch

from retrieval_attn.kernels.rms_norm import rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape, dtype", [
    pytest.param((1, 1, 576), torch.float32, id="decode-row-fp32"),
    pytest.param((2, 7, 576), torch.bfloat16, id="rows-bf16"),
    pytest.param((3, 100), torch.float16, id="c100-fp16"),
    pytest.param((0, 64), torch.float32, id="no-rows"),
])
def test_rms_norm_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    want = rms_norm_ref(x, w, 1e-5)
    got = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5)
    assert got.shape == want.shape and got.dtype == dtype
    # a different order of the float32 sum may move each of the two roundings by one step
    # of the dtype (and Triton's CPU interpreter truncates where the GPU rounds to nearest)
    step = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=step, atol=step)


def test_rms_norm_of_a_strided_view_and_bad_weight():
    x = torch.randn(4, 2, 64)[:, 1]  # rows 128 apart: a view, not contiguous
    w = torch.rand(64)
    torch.testing.assert_close(rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu(),
                               rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x.to(DEVICE), torch.rand(32, device=DEVICE), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [3584, 4096])
def test_rms_norm_real_widths_on_gpu(c):
    x = torch.randn(2048, c, device="cuda").bfloat16()
    w = torch.rand(c, device="cuda").bfloat16()
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6),
                               rtol=2**-7, atol=2**-7)
