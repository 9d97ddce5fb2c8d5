"""Triton guessed queries: RMSNorm, an int8 query projection and RoPE in one launch.

A looked-ahead layer's queries are a guess (the next layer's projection of this layer's
input), re-ranked later with the real ones, so its weights may be int8: half the bytes of
the bfloat16 projection, which the side stream reads once a layer beside the main stream's
matmuls. One program computes ROWS dims of one head and the ROWS dims HALF away, the pairs
RoPE rotates together; every program reads the whole x (from L2) for its own RMS.
"""

import triton
import triton.language as tl


@triton.jit
def guess_query_kernel(X, W, Scale, Bias, Cos, Sin, Out, C, stride_xb, eps,
                       HAS_BIAS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    per_head: tl.constexpr = HALF // ROWS
    head = p // per_head
    dim = (p % per_head) * ROWS + tl.arange(0, ROWS)  # [ROWS] in the first half
    row_a = head * D + dim  # rows of W: the first half's dims and the second's
    row_b = row_a + HALF
    cols = tl.arange(0, BLOCK_C)
    x_row = X + b.to(tl.int64) * stride_xb
    acc_a = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    squares = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        inside = c < C
        x = tl.load(x_row + c, mask=inside, other=0.0).to(tl.float32)
        squares += x * x
        wa = tl.load(W + row_a[:, None].to(tl.int64) * C + c[None, :], mask=inside[None, :],
                     other=0)
        wb = tl.load(W + row_b[:, None].to(tl.int64) * C + c[None, :], mask=inside[None, :],
                     other=0)
        acc_a += wa.to(tl.float32) * x[None, :]
        acc_b += wb.to(tl.float32) * x[None, :]
    inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / C + eps)
    qa = tl.sum(acc_a, axis=1) * tl.load(Scale + row_a) * inv_rms  # [ROWS]
    qb = tl.sum(acc_b, axis=1) * tl.load(Scale + row_b) * inv_rms
    if HAS_BIAS:
        qa += tl.load(Bias + row_a).to(tl.float32)
        qb += tl.load(Bias + row_b).to(tl.float32)
    ca = tl.load(Cos + dim).to(tl.float32)
    cb = tl.load(Cos + HALF + dim).to(tl.float32)
    sa = tl.load(Sin + dim).to(tl.float32)
    sb = tl.load(Sin + HALF + dim).to(tl.float32)
    out = Out + b.to(tl.int64) * tl.num_programs(1) * 2 * ROWS  # [B, H·D] rows
    dt = Out.dtype.element_ty
    tl.store(out + row_a, (qa * ca - qb * sa).to(dt))
    tl.store(out + row_b, (qb * cb + qa * sb).to(dt))
