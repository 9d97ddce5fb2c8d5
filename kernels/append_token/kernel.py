"""Triton kernel: one decode token into the host store, window, tail sums and sketch.

One program per row (kv head of a sequence); everything it writes is that row's, so the
programs never race (the tail's last-added position is kept per row for that reason).
"""

import triton
import triton.language as tl

from retrieval_attn.kernels._jit import round_half_even
from retrieval_attn.kernels.formats import SCALE_MIN as _SCALE_MIN

SCALE_MIN = tl.constexpr(_SCALE_MIN)  # a quantised store's smallest row scale

# SKETCH: what the sketch stores (constexpr: a jit function may read only those globals)
NO_SKETCH = tl.constexpr(0)
FLOAT_SKETCH = tl.constexpr(1)
INT8_SKETCH = tl.constexpr(2)
INT4_SKETCH = tl.constexpr(3)


@triton.jit
def _sketch_half(x, Basis, Scale, stride_bd, dm, d, j, SKETCH: tl.constexpr):
    """x [BLOCK_D] centred key -> its projection on basis columns j (float32), rounded
    to the integers of a quantised sketch (saturating)."""
    b = tl.load(Basis + d[:, None] * stride_bd + j[None, :], mask=dm[:, None], other=0.0)
    p = tl.sum(x[:, None] * b.to(tl.float32), axis=0)
    if SKETCH != FLOAT_SKETCH:
        p = round_half_even(tl.math.div_rn(p, tl.load(Scale + j)))
        if SKETCH == INT8_SKETCH:
            p = tl.minimum(tl.maximum(p, -127.0), 127.0)
        else:
            p = tl.minimum(tl.maximum(p, -7.0), 7.0)
    return p


@triton.jit
def _store_row(Store, Scale, x, dm, d, QUANT: tl.constexpr):
    """x [BLOCK_D] into a store row (at Store); quantised: int8 times a float16 scale (at
    Scale) mapping the row's absmax to 127, as gather_kv.ref.quantize_rows does."""
    if QUANT:
        xf = x.to(tl.float32)
        top = tl.max(tl.where(dm, tl.abs(xf), 0.0), axis=0)
        step = tl.maximum(tl.math.div_rn(top, 127.0), SCALE_MIN).to(tl.float16)
        ints = round_half_even(tl.math.div_rn(xf, step.to(tl.float32)))
        tl.store(Store + d, tl.minimum(tl.maximum(ints, -127.0), 127.0).to(tl.int8), mask=dm)
        tl.store(Scale, step)
    else:
        tl.store(Store + d, x, mask=dm)


@triton.jit
def append_token_kernel(
    Pos, K, V,  # [1], [R, D] x2
    StoreK, StoreV, WinK, WinV,  # [R, N, D] x2 (host), [R, S + W, D] x2
    ScaleK, ScaleV,  # [R, N] float16 x2: a quantised store's row scales (unread: not QUANT)
    Sums, Last,  # [R, M, D] float32 or bfloat16, [R] int64 (unread without HAS_TAIL)
    Mean, Basis, Scale, Keys,  # [R, D], [R, D, r], [R, r], [R, N, w] (unread: NO_SKETCH)
    stride_k, stride_v,
    stride_skr, stride_skn, stride_svr, stride_svn,
    stride_sckr, stride_sckn, stride_scvr, stride_scvn,
    stride_wkr, stride_wkn, stride_wvr, stride_wvn,
    stride_sumr, stride_summ,
    stride_meanr, stride_br, stride_bd, stride_scr, stride_keyr, stride_keyn,
    sinks, window,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_TAIL: tl.constexpr,
    SKETCH: tl.constexpr, R_HALF: tl.constexpr, QUANT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    k = tl.load(K + row * stride_k + d, mask=dm, other=0.0)
    v = tl.load(V + row * stride_v + d, mask=dm, other=0.0)
    _store_row(StoreK + row * stride_skr + pos * stride_skn,
               ScaleK + row * stride_sckr + pos * stride_sckn, k, dm, d, QUANT)
    _store_row(StoreV + row * stride_svr + pos * stride_svn,
               ScaleV + row * stride_scvr + pos * stride_scvn, v, dm, d, QUANT)
    slot = tl.where(pos < sinks, pos, sinks + (pos - sinks) % window)
    tl.store(WinK + row * stride_wkr + slot * stride_wkn + d, k, mask=dm)
    tl.store(WinV + row * stride_wvr + slot * stride_wvn + d, v, mask=dm)
    if HAS_TAIL:
        last = tl.load(Last + row)
        at = Sums + row * stride_sumr + (pos // CHUNK) * stride_summ + d
        old = tl.load(at, mask=dm, other=0.0)
        new = old.to(tl.float32) + tl.where(pos != last, v.to(tl.float32), 0.0)
        # bfloat16 sums: rounded to nearest on a GPU (Triton 3.6's interpreter truncates)
        tl.store(at, new.to(Sums.dtype.element_ty, fp_downcast_rounding="rtne"), mask=dm)
        tl.store(Last + row, pos)
    if SKETCH != NO_SKETCH:
        x = k.to(tl.float32) - tl.load(Mean + row * stride_meanr + d, mask=dm,
                                       other=0.0).to(tl.float32)
        j = tl.arange(0, R_HALF)
        basis, scale = Basis + row * stride_br, Scale + row * stride_scr
        low = _sketch_half(x, basis, scale, stride_bd, dm, d, j, SKETCH)
        high = _sketch_half(x, basis, scale, stride_bd, dm, d, j + R_HALF, SKETCH)
        out = Keys + row * stride_keyr + pos * stride_keyn
        if SKETCH == INT4_SKETCH:  # dim j in the low nibble, dim j + r / 2 in the high
            packed = (low.to(tl.int32) + 8) | ((high.to(tl.int32) + 8) << 4)
            tl.store(out + j, packed.to(tl.uint8))
        else:
            tl.store(out + j, low.to(Keys.dtype.element_ty))
            tl.store(out + R_HALF + j, high.to(Keys.dtype.element_ty))
