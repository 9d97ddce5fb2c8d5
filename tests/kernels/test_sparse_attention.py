"""sparse_attention against sparse_attention_ref (float32, concatenated sources, masked)."""

import pytest
import torch

from retrieval_attn.kernels.gather_kv import gather_kv, gather_kv_ref
from retrieval_attn.kernels.sparse_attention import sparse_attention, sparse_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (max abs diff, relative RMS error) allowed on `out`; lse gets the first number.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def assert_close(name, ref, got, atol, rel_rms):
    ref, got = ref.float(), got.float()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
    diff = (ref - got)[finite]
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rms = diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    ref_rms = ref[finite].pow(2).mean().sqrt().item() if diff.numel() else 0.0
    assert max_abs <= atol, f"{name}: max abs diff {max_abs:.3g} > {atol}"
    assert rms <= rel_rms * max(ref_rms, 1e-12), f"{name}: rel RMS {rms / ref_rms:.3g}"


def _inputs(b, hkv, g, d, na, nb, len_a, len_b, dtype, device=DEVICE):
    q = torch.randn(b, hkv * g, d, device=device).to(dtype)
    k_a, v_a = (torch.randn(b, hkv, na, d, device=device).to(dtype) for _ in range(2))
    k_b, v_b = (torch.randn(b, hkv, nb, d, device=device).to(dtype) for _ in range(2))
    len_a = torch.tensor(len_a, dtype=torch.int32, device=device)
    len_b = torch.tensor(len_b, dtype=torch.int32, device=device)
    return q, k_a, v_a, len_a, k_b, v_b, len_b


def _check(args, dtype, scale=None):
    out, lse = sparse_attention(*args, scale=scale)
    out_ref, lse_ref = sparse_attention_ref(*args, scale=scale)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    atol, rel = TOLERANCE[dtype]
    assert_close("out", out_ref, out, atol, rel)
    assert_close("lse", lse_ref, lse, atol, rel)
    return out, lse


@pytest.mark.parametrize(
    "b, hkv, g, d, na, nb, len_a, len_b, dtype",
    [
        pytest.param(1, 2, 1, 64, 37, 0, [37], [0], torch.float32, id="g1-na37-nb0-fp32"),
        pytest.param(2, 2, 3, 64, 37, 70, [20, 37], [70, 5], torch.float32,
                     id="g3-lenA<Na-fp32"),
        pytest.param(2, 1, 4, 128, 37, 70, [37, 11], [64, 70], torch.bfloat16,
                     id="g4-d128-bf16"),
        pytest.param(1, 1, 7, 128, 21, 45, [21], [45], torch.float16, id="g7-d128-fp16"),
        pytest.param(1, 2, 7, 64, 0, 50, [0], [33], torch.bfloat16, id="g7-na0-bf16"),
        pytest.param(2, 1, 4, 64, 40, 30, [0, 40], [30, 0], torch.float32,
                     id="one-source-empty-per-row"),
        pytest.param(1, 1, 4, 64, 600, 300, [517], [300], torch.float32, id="many-splits"),
    ],
)
def test_matches_reference(b, hkv, g, d, na, nb, len_a, len_b, dtype):
    _check(_inputs(b, hkv, g, d, na, nb, len_a, len_b, dtype), dtype)


@pytest.mark.parametrize("len_a, nb, len_b", [(9000, 0, 0), (0, 200, 130), (4000, 200, 0)],
                         ids=["dense-cache", "first-tiles-empty", "later-tiles-empty"])
def test_more_splits_than_one_merge_tile(monkeypatch, len_a, nb, len_b):
    """A long source a (dense decode over a whole cache) is split into more partials than
    the merge kernel reads at once: it must merge tile by tile, including tiles where every
    split is empty before or after the valid tokens."""
    import importlib

    sa = importlib.import_module("retrieval_attn.kernels.sparse_attention")  # the module
    monkeypatch.setattr(sa, "sm_count", lambda device: 200)  # ~150 splits of 64 tokens
    args = _inputs(1, 1, 4, 16, 9600, nb, [len_a], [len_b], torch.float32)
    _check(args, torch.float32)


def test_broadcast_lengths():
    """Lengths expanded from one value (stride 0), as a batch decoding in lockstep passes."""
    b, hkv, g, d = 3, 2, 3, 64
    q, k_a, v_a, _, k_b, v_b, _ = _inputs(b, hkv, g, d, 40, 30, [0] * b, [0] * b,
                                          torch.float32)
    len_a = torch.tensor([33], dtype=torch.int32, device=DEVICE).expand(b)
    len_b = torch.tensor([21], dtype=torch.int32, device=DEVICE).expand(b)
    _check((q, k_a, v_a, len_a, k_b, v_b, len_b), torch.float32)


def test_custom_scale_and_strided_inputs():
    """Window buffer larger than Na (a slice), token-major retrieved K/V, q from a wider view."""
    b, hkv, g, d = 2, 2, 3, 64
    q = torch.randn(b, hkv * g, 2 * d, device=DEVICE)[..., :d]
    window = torch.randn(2, b, hkv, 50, d, device=DEVICE)
    k_a, v_a = window[0, :, :, :37], window[1, :, :, :37]
    k_b, v_b = (torch.randn(b, 29, hkv, d, device=DEVICE).transpose(1, 2) for _ in range(2))
    len_a = torch.tensor([37, 30], dtype=torch.int32, device=DEVICE)
    len_b = torch.tensor([29, 29], dtype=torch.int64, device=DEVICE)
    _check((q, k_a, v_a, len_a, k_b, v_b, len_b), torch.float32, scale=0.3)


@pytest.mark.parametrize("fill", [float("nan"), 1e4, float("inf")], ids=["nan", "1e4", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_garbage_past_lengths_does_not_leak(fill, dtype):
    args = _inputs(2, 2, 3, 64, 37, 40, [20, 37], [40, 13], dtype)
    q, k_a, v_a, len_a, k_b, v_b, len_b = args
    clean_out, clean_lse = sparse_attention_ref(*args)
    for k, v, ln in ((k_a, v_a, len_a), (k_b, v_b, len_b)):
        for row in range(k.shape[0]):
            k[row, :, ln[row]:] = fill
            v[row, :, ln[row]:] = fill
    out, lse = sparse_attention(*args)
    atol, rel = TOLERANCE[dtype]
    assert_close("out", clean_out, out, atol, rel)
    assert_close("lse", clean_lse, lse, atol, rel)


@pytest.mark.filterwarnings("ignore:divide by zero")  # log2(0) in Triton's interpreter
def test_row_with_no_valid_token():
    """Both lengths 0 for one row (not a supported input, but defined): out 0, lse -inf."""
    args = _inputs(2, 1, 4, 64, 16, 16, [0, 16], [0, 3], torch.float32)
    out, lse = sparse_attention(*args)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    out_ref, lse_ref = sparse_attention_ref(*args)
    assert_close("out", out_ref[1], out[1], *TOLERANCE[torch.float32])


def test_reference_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _inputs(1, 2, 2, 64, 10, 5, [10], [5], torch.float32, device="cpu")
    out, lse = sparse_attention(*args)
    out_ref, lse_ref = sparse_attention_ref(*args)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)


@pytest.mark.parametrize(
    "change",
    ["q-rank", "kv-dtype", "h-not-multiple", "len-shape", "d-not-pow2", "both-empty"],
)
def test_rejects(change):
    q, k_a, v_a, len_a, k_b, v_b, len_b = _inputs(1, 2, 2, 64, 8, 8, [8], [8], torch.float32,
                                                  device="cpu")
    if change == "q-rank":
        q = q[0]
    elif change == "kv-dtype":
        k_b = k_b.half()
    elif change == "h-not-multiple":
        q = q[:, :3]
    elif change == "len-shape":
        len_a = len_a.repeat(2)
    elif change == "d-not-pow2":
        q, k_a, v_a, k_b, v_b = (t[..., :48] for t in (q, k_a, v_a, k_b, v_b))
    elif change == "both-empty":
        k_a, v_a, k_b, v_b = (t[:, :, :0] for t in (k_a, v_a, k_b, v_b))
    with pytest.raises(ValueError):
        sparse_attention(q, k_a, v_a, len_a, k_b, v_b, len_b)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b, len_a, dtype",
    [
        pytest.param(1, [516], torch.bfloat16, id="b1-bf16"),
        pytest.param(2, [516, 300], torch.bfloat16, id="b2-window-filling-bf16"),
        pytest.param(1, [516], torch.float16, id="b1-fp16"),
        pytest.param(1, [516], torch.float32, id="b1-fp32"),
    ],
)
def test_llama3_8b_layer(b, len_a, dtype):
    """H=32, Hkv=8, D=128; window 4 sinks + 512 recent; 2048 retrieved."""
    args = _inputs(b, 8, 4, 128, 516, 2048, len_a, [2048] * b, dtype)
    _check(args, dtype)


@pytest.mark.gpu
def test_gather_then_attend_from_pinned_host():
    """The decode path: zero-copy gather of retrieved K/V from a pinned 128K-token store,
    then attention over window + retrieved, against the reference on the same tokens."""
    hkv, g, d, n, k, na = 8, 4, 128, 131072, 2048, 516
    dtype = torch.bfloat16
    k_host = torch.empty(hkv, n, d, dtype=dtype, pin_memory=True)
    v_host = torch.empty(hkv, n, d, dtype=dtype, pin_memory=True)
    k_host.copy_(torch.randn(hkv, n, d, device="cuda", dtype=dtype))
    v_host.copy_(torch.randn(hkv, n, d, device="cuda", dtype=dtype))
    idx = torch.stack([torch.randperm(n, device="cuda")[:k] for _ in range(hkv)])
    k_b, v_b = gather_kv(k_host, v_host, idx)
    k_ref, v_ref = gather_kv_ref(k_host, v_host, idx.cpu())
    assert torch.equal(k_b.cpu(), k_ref) and torch.equal(v_b.cpu(), v_ref)
    q, k_a, v_a, len_a, _, _, _ = _inputs(1, hkv, g, d, na, 0, [na], [0], dtype)
    len_b = torch.tensor([k], dtype=torch.int32, device="cuda")
    _check((q, k_a, v_a, len_a, k_b[None], v_b[None], len_b), dtype)


def _store(b, hkv, n, d, k, device, gen):
    """int8 store rows [B, Hkv, N, D] x2 with float16 row scales [B, Hkv, N] x2, and rows
    idx [B, Hkv, K] (runs of 4 and single rows, repeats allowed)."""
    rows = [torch.randint(-127, 128, (b, hkv, n, d), generator=gen, dtype=torch.int8)
            for _ in range(2)]
    scales = [(torch.rand(b, hkv, n, generator=gen) * 0.02 + 0.005).half() for _ in range(2)]
    idx = torch.randint(0, n, (b, hkv, k), generator=gen)
    return [t.to(device) for t in rows], [t.to(device) for t in scales], idx.to(device)


@pytest.mark.parametrize("b, hkv, g, d, n, k, len_b, dtype", [
    pytest.param(1, 2, 4, 64, 300, 130, [117], torch.float32, id="fp32"),
    pytest.param(2, 2, 3, 32, 200, 70, [70, 33], torch.bfloat16, id="bf16-batch"),
])
def test_indexed_int8_source_equals_gather_then_attend(b, hkv, g, d, n, k, len_b, dtype):
    """Source b read by index from int8 rows (idx_b, scales_b) is what gather_kv makes of
    them attended as a plain source: the same dequantised rows, so the same output."""
    gen = torch.Generator().manual_seed(7)
    (rk, rv), (sk, sv), idx = _store(b, hkv, n, d, k, DEVICE, gen)
    q = torch.randn(b, hkv * g, d, generator=gen).to(DEVICE, dtype)
    k_a, v_a = (torch.randn(b, hkv, 40, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    len_a = torch.full((b,), 37, dtype=torch.int32, device=DEVICE)
    len_b = torch.tensor(len_b, dtype=torch.int32, device=DEVICE)
    out, lse = sparse_attention(q, k_a, v_a, len_a, rk, rv, len_b, idx_b=idx,
                                scales_b=(sk, sv))
    flat = lambda t: t.reshape(b * hkv, *t.shape[2:])  # noqa: E731
    gk, gv = gather_kv(flat(rk), flat(rv), flat(idx), scales=(flat(sk), flat(sv)),
                       dtype=dtype)
    gk, gv = gk.view(b, hkv, k, d), gv.view(b, hkv, k, d)
    out_g, lse_g = sparse_attention(q, k_a, v_a, len_a, gk, gv, len_b)
    torch.testing.assert_close(out, out_g, atol=0, rtol=0)
    torch.testing.assert_close(lse, lse_g, atol=0, rtol=0)
    out_ref, lse_ref = sparse_attention_ref(q, k_a, v_a, len_a, gk, gv, len_b)
    atol, rel = TOLERANCE[dtype]
    assert_close("out", out_ref, out, atol, rel)
    assert_close("lse", lse_ref, lse, atol, atol)


def test_indexed_source_refuses_float_rows_and_bad_scales():
    gen = torch.Generator().manual_seed(8)
    (rk, rv), (sk, sv), idx = _store(1, 2, 50, 16, 8, DEVICE, gen)
    q = torch.randn(1, 4, 16).to(DEVICE)
    k_a = v_a = torch.randn(1, 2, 4, 16).to(DEVICE)
    ln = torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="int8 store rows"):
        sparse_attention(q, k_a, v_a, ln, rk.float(), rv.float(), ln, idx_b=idx,
                         scales_b=(sk, sv))
    with pytest.raises(ValueError, match="scales_b"):
        sparse_attention(q, k_a, v_a, ln, rk, rv, ln, idx_b=idx, scales_b=(sk[:, :, :9], sv))
    with pytest.raises(ValueError, match="idx_b"):
        sparse_attention(q, k_a, v_a, ln, rk, rv, ln, idx_b=idx[0], scales_b=(sk, sv))


@pytest.mark.gpu
def test_indexed_int8_store_llama_layer_on_gpu():
    """A Llama-3-8B layer's step as decode makes it: 516 window tokens, 4100 chosen rows
    of a 256K int8 store, bfloat16: the output of gather_kv then attention, up to the
    rounding of the bfloat16 output (the two kernels' float32 sums are compiled apart;
    measured: 24 of 4096 values one step apart)."""
    gen = torch.Generator().manual_seed(9)
    n, k = 1 << 18, 4100
    rk, rv = (torch.randint(-127, 128, (1, 8, n, 128), dtype=torch.int8, device="cuda")
              for _ in range(2))
    sk, sv = ((torch.rand(1, 8, n, device="cuda") * 0.02 + 0.005).half() for _ in range(2))
    idx = torch.randint(0, n, (1, 8, k), generator=gen).cuda()
    q = torch.randn(1, 32, 128, device="cuda").bfloat16()
    k_a, v_a = (torch.randn(1, 8, 520, 128, device="cuda").bfloat16() for _ in range(2))
    len_a, len_b = torch.tensor([516], device="cuda"), torch.tensor([k], device="cuda")
    out, lse = sparse_attention(q, k_a, v_a, len_a, rk, rv, len_b, idx_b=idx,
                                scales_b=(sk, sv))
    gk, gv = gather_kv(rk[0], rv[0], idx[0], scales=(sk[0], sv[0]), dtype=torch.bfloat16)
    out_g, lse_g = sparse_attention(q, k_a, v_a, len_a, gk[None], gv[None], len_b)
    torch.testing.assert_close(out.float(), out_g.float(), atol=1e-3, rtol=2**-7)
    torch.testing.assert_close(lse, lse_g, atol=1e-4, rtol=1e-5)
