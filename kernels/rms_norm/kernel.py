"""Triton RMSNorm: one program per row, the row in registers, float32 arithmetic.

In PyTorch the norm is ~8 kernels (upcast, square, mean, add, rsqrt, multiply, downcast,
weight); at decode, where a row is one token, each is a launch of a few microseconds.
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(X, W, Out, stride_x, stride_o, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    x = tl.load(X + row * stride_x + c, mask=c < C, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)
    # rounded once: the reference rounds the normalised row before the weight too, and a
    # float32 -> bfloat16 -> float32 round trip here is folded away by the compiler
    out = (x * inv * w).to(Out.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(Out + row * stride_o + c, out, mask=c < C)
