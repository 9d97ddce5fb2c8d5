"""rerank_shares against rerank_shares_ref, and the ref against the retriever's formula."""

import pytest
import torch

from retrieval_attn.kernels.rerank_shares import rerank_shares, rerank_shares_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(hkv, g, d, c, n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hkv, g, d, generator=gen).to(dtype)
    keys = (torch.randn(hkv, c, d, generator=gen) * 1.5).to(dtype)
    cand = torch.stack([torch.randperm(n, generator=gen)[:c] for _ in range(hkv)])
    total = torch.randn(hkv, g, generator=gen) + 6.0
    return [t.to(device) for t in (q, keys, cand, total)]


@pytest.mark.parametrize("hkv, g, d, c, hi, dtype", [
    pytest.param(2, 3, 32, 100, 150, torch.float32, id="g3-f32-partial-block"),
    pytest.param(1, 7, 64, 128, 200, torch.bfloat16, id="g7-bf16"),
    pytest.param(3, 8, 32, 64, 80, torch.float16, id="g8-fp16"),
    pytest.param(2, 4, 16, 1, 500, torch.float32, id="one-candidate"),
])
def test_rerank_shares_matches_reference(hkv, g, d, c, hi, dtype):
    q, keys, cand, total = _inputs(hkv, g, d, c, 256, dtype)
    hi_t = torch.tensor([hi])
    want = rerank_shares_ref(q, keys, cand, hi_t, total, d**-0.5)
    got = rerank_shares(*(t.to(DEVICE) for t in (q, keys, cand)), hi_t.to(DEVICE),
                        total.to(DEVICE), d**-0.5)
    assert got.shape == (hkv, c) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-8)
    assert (got.cpu()[cand >= hi] == 0).all() and (got.cpu()[cand < hi] > 0).all()


def test_reference_is_the_retrievers_formula():
    """What LowRankRetriever computed with torch ops before the kernel: masked logits,
    minus each head's total, exp, summed over the group."""
    q, keys, cand, total = _inputs(2, 7, 64, 300, 400, torch.float32)
    hi, scale = torch.tensor([250]), 64**-0.5
    exact = (q @ keys.transpose(1, 2)).masked_fill((cand >= hi)[:, None], float("-inf"))
    old = torch.exp(exact * scale - total[..., None]).nan_to_num_(0.0).sum(dim=1)
    torch.testing.assert_close(rerank_shares_ref(q, keys, cand, hi, total, scale), old)


def test_bfloat16_output_is_rounded_float32():
    q, keys, cand, total = _inputs(2, 7, 64, 200, 300, torch.bfloat16)
    hi = torch.tensor([280])
    want = rerank_shares_ref(q, keys, cand, hi, total, 0.125)
    got = rerank_shares(*(t.to(DEVICE) for t in (q, keys, cand)), hi.to(DEVICE),
                        total.to(DEVICE), 0.125, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # one bfloat16 ulp: the GPU rounds to nearest, Triton's CPU interpreter truncates
    torch.testing.assert_close(got.cpu().float(), want, rtol=2**-7, atol=1e-12)


@pytest.mark.parametrize("kw", [
    dict(keys=(2, 10, 16)), dict(cand=(2, 9)), dict(total=(3, 4)), dict(out_dtype=torch.float16)])
def test_bad_shapes_are_refused(kw):
    q = torch.zeros(2, 4, 32)
    keys = torch.zeros(kw.get("keys", (2, 10, 32)))
    cand = torch.zeros(kw.get("cand", (2, 10)), dtype=torch.long)
    total = torch.zeros(kw.get("total", (2, 4)))
    with pytest.raises(ValueError):
        rerank_shares(q, keys, cand, torch.tensor([5]), total, 0.2,
                      kw.get("out_dtype", torch.float32))


@pytest.mark.gpu
def test_rerank_shares_qwen_7b_shape():
    """Qwen2.5-7B shape (Hkv=4, G=7, D=128), 8192 candidates (top_k 2048 × 4), bf16 keys."""
    q, keys, cand, total = _inputs(4, 7, 128, 8192, 1 << 20, torch.bfloat16, device="cuda")
    hi = torch.tensor([1 << 19], device="cuda")
    want = rerank_shares_ref(q, keys, cand, hi, total, 128**-0.5)
    got = rerank_shares(q, keys, cand, hi, total, 128**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    got16 = rerank_shares(q, keys, cand, hi, total, 128**-0.5, out_dtype=torch.bfloat16)
    torch.testing.assert_close(got16.float(), want, rtol=2**-8, atol=1e-12)
