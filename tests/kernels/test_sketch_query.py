"""sketch_query against sketch_query_ref, and as select_scores' query."""

import pytest
import torch

from retrieval_attn.kernels.select_scores import select_scores, select_scores_ref
from retrieval_attn.kernels.sketch_query import (
    sketch_query,
    sketch_query_ref,
    sketch_scores_at,
    sketch_scores_at_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(hkv, g, d, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hkv, g, d, generator=gen).to(dtype)
    basis = torch.randn(hkv, d, r, generator=gen) / d**0.5
    scale = torch.rand(hkv, r, generator=gen) + 0.1
    mean = torch.randn(hkv, d, generator=gen)
    return [t.to(DEVICE) for t in (q, basis, scale, mean)]


@pytest.mark.parametrize("hkv, g, d, r, dtype, integer, with_scale", [
    pytest.param(2, 3, 32, 16, torch.float32, True, True, id="int8-scaled"),
    pytest.param(4, 7, 64, 32, torch.bfloat16, True, False, id="int8-bf16-q"),
    pytest.param(1, 16, 32, 16, torch.float32, False, True, id="float"),
])
def test_matches_reference(hkv, g, d, r, dtype, integer, with_scale):
    q, basis, scale, mean = _inputs(hkv, g, d, r, dtype)
    scale = scale if with_scale else None
    got = sketch_query(q, basis, scale, mean, integer)
    want = sketch_query_ref(q.cpu(), basis.cpu(), None if scale is None else scale.cpu(),
                            mean.cpu(), integer)
    assert got.qr.dtype == (torch.int8 if integer else torch.float32)
    torch.testing.assert_close(got.step.cpu(), want.step, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.const.cpu(), want.const, rtol=1e-5, atol=1e-5)
    if integer:  # the dot sums in its own order: a value on a boundary may round apart
        diff = (got.qr.cpu().int() - want.qr.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
        assert want.qr.abs().max() == 127  # absmax per kv head
    else:
        torch.testing.assert_close(got.qr.cpu(), want.qr, rtol=1e-5, atol=1e-5)


def test_select_scores_scores_a_given_query_as_its_own():
    hkv, g, d, r, n = 2, 3, 32, 16, 400
    q, basis, scale, mean = _inputs(hkv, g, d, r, torch.float32, seed=1)
    keys = torch.randint(-127, 128, (hkv, n, r), dtype=torch.int8).to(DEVICE)
    hi, other = torch.tensor([n - 30], device=DEVICE), torch.zeros(hkv, g, device=DEVICE)
    folded = basis * scale[:, None, :]
    query = sketch_query(q, basis, scale, mean, True)
    got = select_scores(q, folded, mean, keys, 8, hi, d**-0.5, other, query=query)
    want = select_scores_ref(q, folded, mean, keys, 8, hi, d**-0.5, other)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("keys_dtype, r", [(torch.int8, 16), (torch.bfloat16, 16),
                                           (torch.uint8, 16), (torch.uint8, 32)])
def test_scores_at_positions_match_reference(keys_dtype, r, monkeypatch):
    """Rank 16 of packed int4 takes the reference (dots of 8 columns), rank 32 the kernel
    (checked: the reference is made to fail)."""
    if keys_dtype == torch.uint8 and r == 32:
        import importlib

        module = importlib.import_module("retrieval_attn.kernels.sketch_query")
        monkeypatch.setattr(module, "sketch_scores_at_ref", None)  # not to be called
    hkv, g, d, n, k = 2, 7, 32, 500, 100
    q, basis, scale, mean = _inputs(hkv, g, d, r, torch.float32, seed=2)
    integer = not keys_dtype.is_floating_point
    width = r // 2 if keys_dtype == torch.uint8 else r
    keys = (torch.randint(-127 if keys_dtype == torch.int8 else 0, 128, (hkv, n, width))
            .to(keys_dtype) if integer else torch.randn(hkv, n, r).to(keys_dtype)).to(DEVICE)
    query = sketch_query_ref(q.cpu(), basis.cpu(), scale.cpu(), mean.cpu(), integer)
    positions = torch.randint(0, n, (hkv, k))
    got = sketch_scores_at(query._replace(**{f: getattr(query, f).to(DEVICE)
                                             for f in query._fields}),
                           keys, positions.to(DEVICE))
    want = sketch_scores_at_ref(query, keys.cpu(), positions)  # the test module's import
    assert got.shape == (hkv, g, k)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


def test_rejects_a_basis_of_another_head_dim():
    q, basis, scale, mean = _inputs(2, 3, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="need basis"):
        sketch_query(q, basis[:, :16], scale, mean, True)
