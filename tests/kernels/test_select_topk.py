"""select_topk against select_topk_ref (and torch.topk's values)."""

import pytest
import torch

from retrieval_attn.kernels.select_topk import select_topk, select_topk_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows, c, k, dtype, ties", [
    pytest.param(3, 100, 17, torch.float32, False, id="f32"),
    pytest.param(4, 4096, 2048, torch.bfloat16, True, id="rerank-shape-bf16-ties"),
    pytest.param(2, 50, 50, torch.float32, False, id="all"),
    pytest.param(2, 64, 1, torch.float16, True, id="one-of-ties"),
    pytest.param(3, 1000, 300, torch.float16, False, id="f16-distinct"),
    pytest.param(2, 2048, 700, torch.float32, "close", id="f32-cut-in-the-low-bits"),
])
def test_matches_reference(rows, c, k, dtype, ties):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c, generator=gen)
    if ties == "close":  # values that share their top bits: the low bits decide the cut
        x = 1.0 + x * 1e-5
    elif ties:  # few distinct values: the cut falls inside a run of equal values
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


@pytest.mark.parametrize("rows, c, k, always", [
    pytest.param(3, 100, 17, 4, id="runs-of-4"),
    pytest.param(4, 4096, 2048, 4, id="rerank-shape"),
    pytest.param(2, 50, 0, 3, id="none-chosen"),
    pytest.param(2, 64, 8, 0, id="no-always"),
])
def test_values_and_always_columns(rows, c, k, always):
    """select_topk_values: the top-k columns, then C .. C + always - 1, and the values of
    another row at them (a re-rank's chosen candidates and their positions)."""
    from retrieval_attn.kernels.select_topk import select_topk_values, select_topk_values_ref

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, c, generator=gen).to(torch.bfloat16)
    values = torch.randint(0, 1 << 40, (rows, c + always), generator=gen)
    cols, taken = select_topk_values(x.to(DEVICE), k, values.to(DEVICE), always)
    want_cols, want_taken = select_topk_values_ref(x, k, values, always)
    assert torch.equal(cols.cpu(), want_cols) and torch.equal(taken.cpu(), want_taken)
    assert torch.equal(want_cols[:, :k], select_topk_ref(x, k))
    assert torch.equal(want_cols[:, k:], torch.arange(c, c + always).expand(rows, always))
    assert torch.equal(want_taken, values.gather(1, want_cols))


def test_values_of_the_wrong_shape_are_refused():
    from retrieval_attn.kernels.select_topk import select_topk_values

    with pytest.raises(ValueError, match="C \\+ always"):
        select_topk_values(torch.zeros(2, 5), 2, torch.zeros(2, 5, dtype=torch.long), 4)


@pytest.mark.parametrize("rows, c, k", [
    pytest.param(2, 3000, 40, id="one-chunk"),
    pytest.param(2, 8192 * 3 + 5, 300, id="short-last-chunk"),
    pytest.param(1, 8192 * 9, 1024, id="three-stages"),
])
def test_topk_indices_in_stages_finds_the_top_k(rows, c, k):
    """topk_indices: the same set of columns as torch.topk (distinct values), for rows
    longer than a program holds (stages of select_topk), padding short chunks."""
    from retrieval_attn.kernels.select_topk import topk_indices

    gen = torch.Generator().manual_seed(2)
    x = torch.rand(rows, c, generator=gen)  # distinct, >= 0 (as block sums are)
    x[:, -3:] = -1.0  # blocks past the region
    got = topk_indices(x.to(DEVICE), k).cpu()
    want = x.topk(k, dim=-1).indices
    assert got.shape == (rows, k)
    assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)
