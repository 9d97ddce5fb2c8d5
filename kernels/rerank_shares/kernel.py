"""Triton kernel: exact shares of re-rank candidates in one pass over their gathered keys.

Replaces a bmm and about eight elementwise kernels per layer (mask, cast, scale, subtract,
exp, sum over the group) with one launch; the [Hkv, G, C] logits stay in registers.
"""

import triton
import triton.language as tl


@triton.jit
def rerank_shares_kernel(
    Q, Keys, Cand, Hi, Total, Out,  # [Hkv, G, D], [Hkv, C, D], [Hkv, C], [1], [Hkv, G], [Hkv, C]
    C, G, scale,
    stride_qh, stride_qg,
    stride_kh, stride_kc,
    stride_ch, stride_th, stride_oh,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + h * stride_qh + g[:, None] * stride_qg + d[None, :],
                mask=g[:, None] < G, other=0.0)  # [G_PAD, D]
    k = tl.load(Keys + h * stride_kh + c[:, None].to(tl.int64) * stride_kc + d[None, :],
                mask=c[:, None] < C, other=0.0)  # [BLOCK_C, D]
    if F32_DOT:  # float32 inputs, or the interpreter (its bf16/fp16 dot is wrong)
        x = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        x = tl.dot(q, tl.trans(k))  # [G_PAD, BLOCK_C], float32 accumulate
    total = tl.load(Total + h * stride_th + g, mask=g < G, other=float("inf"))
    p = tl.exp(x * scale - total[:, None])  # padded heads: exp(-inf) = 0
    shares = tl.sum(p, axis=0)  # [BLOCK_C]
    pos = tl.load(Cand + h * stride_ch + c, mask=c < C, other=0)
    shares = tl.where(pos < tl.load(Hi), shares, 0.0)
    out = shares.to(Out.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(Out + h * stride_oh + c, out, mask=c < C)
