"""select_topk against select_topk_ref (and torch.topk's values)."""

import pytest
import torch

from retrieval_attn.kernels import select_topk, select_topk_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows, c, k, dtype, ties", [
    pytest.param(3, 100, 17, torch.float32, False, id="f32"),
    pytest.param(4, 4096, 2048, torch.bfloat16, True, id="rerank-shape-bf16-ties"),
    pytest.param(2, 50, 50, torch.float32, False, id="all"),
    pytest.param(2, 64, 1, torch.float16, True, id="one-of-ties"),
])
def test_matches_reference(rows, c, k, dtype, ties):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c, generator=gen)
    if ties:  # few distinct values: the cut falls inside a run of equal values
        x = (x * 2).round()
    x[0, :5] = float("-inf")  # excluded candidates
    x = x.to(dtype)
    got = select_topk(x.to(DEVICE), k).cpu()
    want = select_topk_ref(x, k)
    assert torch.equal(got, want)
    assert (got.diff(dim=-1) > 0).all()  # increasing
    kept = x.float().gather(1, got).sort(dim=-1, descending=True).values
    torch.testing.assert_close(kept, x.float().topk(k, dim=-1).values)


def test_rejects_k_above_the_row():
    with pytest.raises(ValueError, match="k <= C"):
        select_topk(torch.zeros(2, 5), 6)


@pytest.mark.gpu
def test_long_rows_take_the_reference_on_the_gpu():
    x = torch.randn(2, 10000, device="cuda")
    assert torch.equal(select_topk(x, 300), select_topk_ref(x, 300))
