"""window_lse against window_lse_ref."""

import pytest
import torch

from retrieval_attn.kernels.window_lse import window_lse, window_lse_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows, g, s, d, valid, dtype", [
    pytest.param(2, 3, 20, 32, 20, torch.float32, id="full"),
    pytest.param(4, 7, 130, 64, 77, torch.float32, id="partly-filled"),
    pytest.param(1, 16, 70, 32, 1, torch.bfloat16, id="one-slot-bf16"),
    # a real float32 shape (Qwen2.5-Coder-1.5B: 6 heads a kv head, 128 dims, 516 slots):
    # 256-slot tiles of float32 keys once overflowed an H100's shared memory
    pytest.param(4, 6, 516, 128, 516, torch.float32, id="fp32-d128-real",
                 marks=pytest.mark.gpu),
])
def test_matches_reference(rows, g, s, d, valid, dtype):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(rows, g, d, generator=gen) * 2).to(dtype).to(DEVICE)
    k = torch.randn(rows, s, d, generator=gen).to(dtype).to(DEVICE)
    k[:, valid:] = 100  # unfilled slots hold anything: they must not count
    filled = torch.tensor([valid], device=DEVICE, dtype=torch.int32)
    got = window_lse(q, k, filled, d**-0.5)
    want = window_lse_ref(q.float().cpu(), k.float().cpu(), filled.cpu(), d**-0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_no_filled_slot_gives_minus_infinity():
    q, k = torch.randn(2, 3, 32, device=DEVICE), torch.randn(2, 8, 32, device=DEVICE)
    got = window_lse(q, k, torch.tensor([0], device=DEVICE), 0.1)
    assert torch.isneginf(got).all()


def test_rejects_keys_of_another_head_dim():
    with pytest.raises(ValueError, match="window keys"):
        window_lse(torch.randn(2, 3, 32), torch.randn(2, 8, 16), torch.tensor([3]), 0.1)


def test_a_skipped_slot_does_not_count():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 5, 32, generator=gen).to(DEVICE)
    k = torch.randn(3, 90, 32, generator=gen).to(DEVICE)
    filled = torch.tensor([90], device=DEVICE)
    skip = torch.tensor([41], device=DEVICE)
    got = window_lse(q, k, filled, 0.2, skip)
    without = torch.cat([k[:, :41], k[:, 42:]], dim=1)
    want = window_lse_ref(q.cpu(), without.cpu(), torch.tensor([89]), 0.2)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(window_lse_ref(q.cpu(), k.cpu(), filled.cpu(), 0.2,
                                              skip.cpu()), want, rtol=1e-5, atol=1e-5)
    k[:, 41] = 50  # a huge score in the skipped slot changes nothing
    torch.testing.assert_close(window_lse(q, k, filled, 0.2, skip).cpu(), want, rtol=1e-4,
                               atol=1e-4)
