"""Triton kernel: log-sum-exp of a decode query's scores over the window, per head.

One program per row (kv head of a sequence): its G query heads against every filled slot,
tile by tile with a running max and sum (flash-decoding's first half, without values).
"""

import triton
import triton.language as tl


@triton.jit
def window_lse_kernel(
    Q, K, Valid, Skip, Out, G, S, scale,
    stride_qr, stride_qg, stride_kr, stride_ks, stride_or,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_SKIP: tl.constexpr,  # Skip [1]: a slot left out (unread without it)
):
    r = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + r * stride_qr + g[:, None] * stride_qg + d[None, :], mask=g[:, None] < G,
                other=0.0)  # [G_PAD, D]
    valid = tl.minimum(tl.load(Valid).to(tl.int32), S)
    skip = tl.load(Skip).to(tl.int32) if HAS_SKIP else -1
    m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((G_PAD,), dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        ok = (s < valid) & (s != skip)
        k = tl.load(K + r * stride_kr + s[:, None] * stride_ks + d[None, :],
                    mask=ok[:, None], other=0.0)  # [BLOCK_S, D]
        if DOT_F32:
            x = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(k))
        x = tl.where(ok[None, :], x * scale, float("-inf"))  # [G_PAD, BLOCK_S]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # a head with no filled slot yet keeps m = -inf: exp(-inf - -inf) is avoided
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(acc > 0, m + tl.log(acc), float("-inf"))
    tl.store(Out + r * stride_or + g, lse, mask=g < G)
