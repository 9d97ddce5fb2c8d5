"""gather_kv against gather_kv_ref: a copy, so results must match exactly."""

import pytest
import torch

from retrieval_attn.kernels.gather_kv import gather_k, gather_kv, gather_kv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _store(hkv, n, d, dtype, layout="contiguous", device="cpu"):
    """k, v: [Hkv, N, D] with the requested memory layout (values distinct per row)."""
    def make():
        if layout == "token-major":  # [N, Hkv, D] storage seen as [Hkv, N, D]
            return torch.randn(n, hkv, d, device=device).to(dtype).transpose(0, 1)
        if layout == "layer-slice":  # one layer of a [L, Hkv, N, D] store
            return torch.randn(3, hkv, n, d, device=device).to(dtype)[1]
        return torch.randn(hkv, n, d, device=device).to(dtype)
    return make(), make()


@pytest.mark.parametrize(
    "hkv, n, d, k, dtype, idx_dtype, layout",
    [
        pytest.param(1, 10, 64, 1, torch.float32, torch.int64, "contiguous", id="one-row"),
        pytest.param(3, 100, 64, 37, torch.bfloat16, torch.int32, "contiguous", id="k37-bf16"),
        pytest.param(2, 257, 128, 50, torch.float16, torch.int64, "token-major",
                     id="token-major-fp16"),
        pytest.param(4, 64, 128, 33, torch.float32, torch.int32, "layer-slice",
                     id="layer-slice-fp32"),
        pytest.param(2, 50, 48, 20, torch.bfloat16, torch.int32, "contiguous", id="d48"),
        # more tiles than a host launch's programs: each program loops over several
        pytest.param(2, 900, 64, 700, torch.bfloat16, torch.int64, "contiguous",
                     id="programs-loop"),
    ],
)
def test_gather_matches_reference(hkv, n, d, k, dtype, idx_dtype, layout):
    k_src, v_src = _store(hkv, n, d, dtype, layout)
    idx = torch.randint(0, n, (hkv, k), dtype=idx_dtype)
    idx[:, 0] = n - 1  # the last row too
    k_out, v_out = gather_kv(k_src.to(DEVICE), v_src.to(DEVICE), idx.to(DEVICE))
    k_ref, v_ref = gather_kv_ref(k_src, v_src, idx)
    assert k_out.shape == (hkv, k, d) and k_out.dtype == dtype
    assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)
    assert torch.equal(k_ref[1 % hkv, 0], k_src[1 % hkv, n - 1])


def test_gather_into_out():
    k_src, v_src = _store(2, 40, 64, torch.bfloat16, device=DEVICE)
    idx = torch.randint(0, 40, (2, 19), dtype=torch.int32, device=DEVICE)
    out = (torch.empty(2, 19, 64, dtype=torch.bfloat16, device=DEVICE),
           torch.empty(2, 19, 64, dtype=torch.bfloat16, device=DEVICE))
    k_out, v_out = gather_kv(k_src, v_src, idx, out=out)
    assert k_out is out[0] and v_out is out[1]
    k_ref, v_ref = gather_kv_ref(k_src, v_src, idx)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_gather_empty_selection():
    k_src, v_src = _store(2, 8, 64, torch.float32, device=DEVICE)
    k_out, v_out = gather_kv(k_src, v_src, torch.zeros(2, 0, dtype=torch.int64, device=DEVICE))
    assert k_out.shape == (2, 0, 64) and v_out.shape == (2, 0, 64)


def test_reference_fallback_without_interpreter(monkeypatch):
    """CPU without TRITON_INTERPRET: the wrapper returns the reference's result."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    k_src, v_src = _store(2, 30, 64, torch.float32)
    idx = torch.randint(0, 30, (2, 7))
    k_out, v_out = gather_kv(k_src, v_src, idx)
    k_ref, v_ref = gather_kv_ref(k_src, v_src, idx)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


@pytest.mark.parametrize(
    "k_shape, v_shape, idx_shape, idx_dtype, v_dtype",
    [
        pytest.param((2, 8, 64), (2, 9, 64), (2, 3), torch.int64, torch.float32, id="kv-shape"),
        pytest.param((2, 8, 64), (2, 8, 64), (2, 3), torch.int64, torch.float16, id="kv-dtype"),
        pytest.param((2, 8, 64), (2, 8, 64), (3, 3), torch.int64, torch.float32, id="idx-heads"),
        pytest.param((2, 8, 64), (2, 8, 64), (2, 3), torch.float32, torch.float32,
                     id="idx-dtype"),
        pytest.param((8, 64), (8, 64), (2, 3), torch.int64, torch.float32, id="src-rank"),
    ],
)
def test_gather_rejects(k_shape, v_shape, idx_shape, idx_dtype, v_dtype):
    k_src = torch.zeros(k_shape)
    v_src = torch.zeros(v_shape, dtype=v_dtype)
    with pytest.raises(ValueError):
        gather_kv(k_src, v_src, torch.zeros(idx_shape, dtype=idx_dtype))


def test_gather_rejects_bad_out():
    k_src, v_src = _store(2, 8, 64, torch.float32)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError):
        gather_kv(k_src, v_src, idx, out=(torch.zeros(2, 4, 64), torch.zeros(2, 3, 64)))


def _pinned_store(hkv, n, d, dtype, layers=1):
    """[L, Hkv, N, D] K and V in pinned host memory, filled from the GPU (fast)."""
    def make():
        host = torch.empty(layers, hkv, n, d, dtype=dtype, pin_memory=True)
        host.copy_(torch.randn(layers, hkv, n, d, device="cuda", dtype=dtype))
        return host
    return make(), make()


@pytest.mark.gpu
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_gather_pinned_host_llama3_8b_layer(idx_dtype):
    """Zero-copy gather from a pinned host store: H_kv=8, D=128, 128K tokens, K=2048, bf16."""
    hkv, n, d, k = 8, 131072, 128, 2048
    k_store, v_store = _pinned_store(hkv, n, d, torch.bfloat16, layers=2)
    k_src, v_src = k_store[1], v_store[1]  # one layer, a strided view into the store
    assert k_src.is_pinned() and not k_src.is_cuda
    idx = torch.stack([torch.randperm(n, device="cuda")[:k] for _ in range(hkv)]).to(idx_dtype)
    idx[:, 0] = n - 1
    k_out, v_out = gather_kv(k_src, v_src, idx)
    torch.cuda.synchronize()
    assert k_out.is_cuda and k_out.dtype == torch.bfloat16
    k_ref, v_ref = gather_kv_ref(k_src, v_src, idx.cpu())
    assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)
    # Same kernel from device memory, into preallocated outputs.
    out = (torch.empty_like(k_out), torch.empty_like(v_out))
    gather_kv(k_src.cuda(), v_src.cuda(), idx, out=out)
    assert torch.equal(out[0], k_out) and torch.equal(out[1], v_out)


@pytest.mark.gpu
def test_gather_rejects_pageable_host_source():
    k_src = torch.zeros(2, 8, 64)
    idx = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="pinned"):
        gather_kv(k_src, k_src.clone(), idx)


@pytest.mark.parametrize("hkv, n, d, k", [pytest.param(3, 100, 64, 37, id="k37"),
                                          pytest.param(1, 10, 48, 1, id="one-row-d48")])
def test_gather_k_matches_the_k_half_of_the_reference(hkv, n, d, k):

    k_src = torch.randn(hkv, n, d)
    idx = torch.randint(0, n, (hkv, k))
    want, _ = gather_kv_ref(k_src, k_src, idx)
    got = gather_k(k_src.to(DEVICE), idx.to(DEVICE))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("heads_per_span", [1, 2, 3], ids=["1-head", "2-heads", "3-heads"])
def test_host_gather_in_head_groups(heads_per_span):
    """Host sources are gathered in launches of a few heads each (max_host_span, default
    MAX_HOST_SPAN; K and V apart when a head's K+V alone exceed it): every grouping gives
    the reference's rows."""
    hkv, n, d, k = 5, 64, 32, 21
    span = heads_per_span * n * d * 2  # heads_per_span heads' bytes in bf16
    if DEVICE == "cuda":
        k_store, v_store = _pinned_store(hkv, n, d, torch.bfloat16, layers=2)
        k_src, v_src = k_store[1], v_store[1]
    else:
        k_src, v_src = _store(hkv, n, d, torch.bfloat16, "layer-slice")
    idx = torch.randint(0, n, (hkv, k), device=DEVICE)
    k_ref, v_ref = gather_kv_ref(k_src, v_src, idx.cpu())
    k_out, v_out = gather_kv(k_src, v_src, idx, max_host_span=span)
    assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)
    assert torch.equal(gather_k(v_src, idx, max_host_span=span).cpu(), v_ref)
    assert torch.equal(gather_k(v_src, idx).cpu(), v_ref)  # the default span


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_of_a_quantised_store_dequantises(dtype):
    """int8 rows with a scale per row (device memory): rows come out as ints * scale."""
    from retrieval_attn.kernels.formats import dequantize_rows, quantize_rows

    hkv, n, d, k = 3, 90, 64, 41
    src = [torch.randn(hkv, n, d) * 4 for _ in range(2)]
    (kq, ks), (vq, vs) = (quantize_rows(x) for x in src)
    idx = torch.randint(0, n, (hkv, k))
    args = [t.to(DEVICE) for t in (kq, vq, idx)]
    k_out, v_out = gather_kv(*args, scales=(ks.to(DEVICE), vs.to(DEVICE)), dtype=dtype)
    k_ref, v_ref = gather_kv_ref(kq, vq, idx, scales=(ks, vs), dtype=dtype)
    assert k_out.dtype == dtype
    _assert_rounded_alike(k_out.cpu(), k_ref)
    _assert_rounded_alike(v_out.cpu(), v_ref)
    want = dequantize_rows(kq[1, idx[1]], ks[1, idx[1]], dtype)
    assert torch.equal(k_ref[1], want)
    torch.testing.assert_close(k_ref.float(), src[0].gather(1, idx[..., None].expand(-1, -1, d)),
                               atol=float(ks.max()) / 2 + 0.02, rtol=0.01)
    only_v = gather_k(args[1], args[2], scale=vs.to(DEVICE), dtype=dtype)
    _assert_rounded_alike(only_v.cpu(), v_ref)


def _assert_rounded_alike(got, want):
    """Equal; but the Triton interpreter casts float32 to bfloat16 by truncation, where
    the GPU (and torch) round to nearest: one bfloat16 step apart at most there."""
    if DEVICE == "cuda" or got.dtype != torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=0, rtol=2**-7)


def test_gather_rejects_scales_of_a_float_store_or_without_a_dtype():
    k_src, v_src = _store(2, 20, 64, torch.float32)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    scale = torch.ones(2, 20, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales go with int8 sources"):
        gather_k(k_src, idx, scale=scale, dtype=torch.float32)
    with pytest.raises(ValueError, match="scales go with int8 sources"):
        gather_k(k_src.to(torch.int8), idx, scale=scale)
    with pytest.raises(ValueError, match="only int8 sources"):
        gather_k(k_src, idx, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gather_of_a_pinned_int8_store_at_a_real_shape():
    from retrieval_attn.kernels.formats import quantize_rows

    hkv, n, d = 4, 1 << 18, 128
    ints, scale = quantize_rows(torch.randn(hkv, n, d, device="cuda"))
    host = ints.cpu().pin_memory()
    idx = torch.randint(0, n, (hkv, 4096), device="cuda")
    got = gather_k(host, idx, scale=scale, dtype=torch.bfloat16)
    want = gather_kv_ref(ints, ints, idx, scales=(scale, scale), dtype=torch.bfloat16)[0]
    assert torch.equal(got, want)
