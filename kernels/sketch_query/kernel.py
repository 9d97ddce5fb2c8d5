"""Triton kernel: q @ basis (scales folded in), its int8 rounding and q·mean, per kv head.

One program per kv head: the G query heads' products are one [G_PAD, D] x [D, r] float32
dot. Replaces the ~8 small torch kernels (basis times scales, two products, abs, max,
divide, round, clamp, cast) a layer's decode step spent on it.
"""

import triton
import triton.language as tl

from retrieval_attn.kernels._jit import int4_nibbles, round_half_even


@triton.jit
def sketch_query_kernel(
    Q, Basis, Scale, Mean, Qr, Step, Const, G,
    stride_qh, stride_qg, stride_bh, stride_bd, stride_sh, stride_mh,
    stride_oh, stride_og, stride_ch,
    D: tl.constexpr, R: tl.constexpr, G_PAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    INTEGER: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    j = tl.arange(0, R)
    q = tl.load(Q + h * stride_qh + g[:, None] * stride_qg + d[None, :], mask=g[:, None] < G,
                other=0.0).to(tl.float32)  # [G_PAD, D]
    b = tl.load(Basis + h * stride_bh + d[:, None] * stride_bd + j[None, :]).to(tl.float32)
    if HAS_SCALE:
        b = b * tl.load(Scale + h * stride_sh + j)[None, :]
    qr = tl.dot(q, b, input_precision="ieee")  # [G_PAD, R]; padded rows are 0
    const = tl.sum(q * tl.load(Mean + h * stride_mh + d).to(tl.float32)[None, :], axis=1)
    tl.store(Const + h * stride_ch + g, const, mask=g < G)
    out = Qr + h * stride_oh + g[:, None] * stride_og + j[None, :]
    if INTEGER:  # absmax over the kv head's group, as formats.quantize_query
        step = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(qr), axis=1), axis=0), 1e-30),
                              127.0)
        ints = round_half_even(tl.math.div_rn(qr, step))
        ints = tl.minimum(tl.maximum(ints, -127.0), 127.0)
        tl.store(out, ints.to(tl.int8), mask=g[:, None] < G)
        tl.store(Step + h, step)
    else:
        tl.store(out, qr, mask=g[:, None] < G)
        tl.store(Step + h, 1.0)


@triton.jit
def sketch_scores_at_kernel(
    Qr, Step, Const, Keys, Pos, Out, G, K,
    stride_qh, stride_qg, stride_ch, stride_kh, stride_kn, stride_ph, stride_oh, stride_og,
    R: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr,
    PACKED: tl.constexpr,  # packed int4 keys [.., R / 2] (kernels/formats.py)
):
    """Scores [G, BLOCK] of a block of given positions: const + step · qr·keys[pos]. The
    products are float32 dots of integers below 2**24 (int8 sketches), so exact."""
    h = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = tl.arange(0, G_PAD)
    W: tl.constexpr = R // 2 if PACKED else R  # stored values per position
    j = tl.arange(0, W)
    q_row = Qr + h * stride_qh + g[:, None] * stride_qg + j[None, :]
    qr = tl.load(q_row, mask=g[:, None] < G, other=0).to(tl.float32)  # [G_PAD, W]
    pos = tl.load(Pos + h * stride_ph + i, mask=i < K, other=0).to(tl.int64)
    keys = tl.load(Keys + h * stride_kh + pos[:, None] * stride_kn + j[None, :],
                   mask=(i < K)[:, None], other=0)  # [BLOCK, W]
    if PACKED:  # a byte holds dims j (low nibble) and j + R / 2, each v + 8
        qr_b = tl.load(q_row + W, mask=g[:, None] < G, other=0).to(tl.float32)
        low, high = int4_nibbles(keys, True)  # a few positions: per-byte ops suffice
        low = (low - 8).to(tl.float32)
        high = (high - 8).to(tl.float32)
        x = (tl.dot(qr, tl.trans(low), input_precision="ieee")
             + tl.dot(qr_b, tl.trans(high), input_precision="ieee"))
    else:
        x = tl.dot(qr, tl.trans(keys.to(tl.float32)), input_precision="ieee")
    x = x * tl.load(Step + h)
    x += tl.load(Const + h * stride_ch + g, mask=g < G, other=0.0)[:, None]
    tl.store(Out + h * stride_oh + g[:, None] * stride_og + i[None, :], x,
             mask=(g[:, None] < G) & (i < K)[None, :])
