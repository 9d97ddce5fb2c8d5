"""Triton rotary embedding: one program per (batch, head, token) row, both halves at once.

PyTorch spends ~5 kernels on it (negate, concatenate, two products, sum) for q and again
for k, each a launch of a few microseconds at decode. Here the products and the sum are in
float32 and rounded once, at the store; PyTorch rounds each product and the sum to the
dtype, so in bfloat16 the two differ by up to a step of the dtype in ~a quarter of the
values. (Rounding the products in the kernel does not reproduce PyTorch: the compiler
folds a float32 -> bfloat16 -> float32 round trip away, measured on the H100.)
"""

import triton
import triton.language as tl


@triton.jit
def rope_kernel(X, Cos, Sin, Out, H, T, stride_xb, stride_xh, stride_xt, stride_ct,
                stride_st, HALF: tl.constexpr):
    row = tl.program_id(0)
    t = row % T
    h = (row // T) % H
    b = row // (T * H)
    x_row = X + b.to(tl.int64) * stride_xb + h * stride_xh + t.to(tl.int64) * stride_xt
    out_row = Out + row.to(tl.int64) * (2 * HALF)
    d = tl.arange(0, HALF)
    x1 = tl.load(x_row + d).to(tl.float32)
    x2 = tl.load(x_row + HALF + d).to(tl.float32)
    c1 = tl.load(Cos + t * stride_ct + d).to(tl.float32)
    c2 = tl.load(Cos + t * stride_ct + HALF + d).to(tl.float32)
    s1 = tl.load(Sin + t * stride_st + d).to(tl.float32)
    s2 = tl.load(Sin + t * stride_st + HALF + d).to(tl.float32)
    dt = Out.dtype.element_ty
    tl.store(out_row + d, (x1 * c1 - x2 * s1).to(dt, fp_downcast_rounding="rtne"))
    tl.store(out_row + HALF + d, (x2 * c2 + x1 * s2).to(dt, fp_downcast_rounding="rtne"))
