"""Triton kernels: low-rank scores -> per-head log-sum-exp -> group shares, fused.

Exact normalisation takes two passes over the sketch keys (rank r, so each pass reads
N*r values per kv head): `lse_partial_kernel` keeps a running max and sum of exp per query
head over one chunk of positions and writes the partials; `shares_kernel` merges the
partials (and the window's log-sum-exp) into each head's lse, recomputes the scores of its
chunk and writes sum_g exp(score - lse_g), one float per position. The [Hkv, G, N] scores
are never stored. With ONE_PASS, shares_kernel normalises by a log-sum-exp known before the
pass (the previous decode step's, see __init__.py) and writes this pass's partials (the
largest score, and the sum of the shares' own exps in that frame), which `lse_state_kernel`
merges into the state the next step reads: the sketch is read once.
q @ basis is computed by the wrapper in float32 and handed over as a hi + lo pair in the
keys' dtype, so the scores come from tensor-core dots yet are float32-accurate.
Quantised sketches (KEY_BITS 8: int8 keys; 4: two int4 per uint8 byte, ref.py's format) are
scored by int8 tensor-core dots against an int8 q @ basis: converting the keys to floats
instead costs more than reading them (H100, 1M tokens, 28 layers: 19.6 ms for int4 of rank
128 through float16, against 6.4 ms for bfloat16 of rank 32, the same bytes).
"""

import triton
import triton.language as tl

from .._jit import log_add


@triton.jit
def _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD: tl.constexpr, WIDTH: tl.constexpr,
           OFFSET: tl.constexpr):
    """Columns [OFFSET, OFFSET + WIDTH) of kv head h's q @ basis, as a (hi, lo) pair."""
    g = tl.arange(0, G_PAD)
    r = OFFSET + tl.arange(0, WIDTH)
    off = h * stride_qh + g[:, None] * stride_qg + r[None, :]
    qr_hi = tl.load(QrHi + off, mask=g[:, None] < G, other=0.0)
    qr_lo = tl.load(QrLo + off, mask=g[:, None] < G, other=0.0)
    return qr_hi, qr_lo


@triton.jit
def _queries(QrHi, QrLo, C, Mul, h, stride_qh, stride_qg, stride_ch, G,
             G_PAD: tl.constexpr, R: tl.constexpr, KEY_BITS: tl.constexpr):
    """Kv head h's q @ basis as (hi, lo) pairs, split in halves for packed int4 keys (whose
    bytes hold dims j and j + R/2), q·mean [G_PAD] and the scores' multiplier."""
    if KEY_BITS == 4:
        qa_hi, qa_lo = _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD, R // 2, 0)
        qb_hi, qb_lo = _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD, R // 2, R // 2)
    else:
        qa_hi, qa_lo = _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD, R, 0)
        qb_hi, qb_lo = qa_hi, qa_lo  # unused
    g = tl.arange(0, G_PAD)
    c = tl.load(C + h * stride_ch + g, mask=g < G, other=0.0)
    if KEY_BITS == 16:
        mul = 1.0  # float keys: Mul is unread
    else:
        mul = tl.load(Mul + h)
    return qa_hi, qa_lo, qb_hi, qb_lo, c, mul


@triton.jit
def _dot(qr_hi, qr_lo, k, F32_DOT: tl.constexpr, HI_LO: tl.constexpr):
    """[G_PAD, W] x keys [BLOCK_N, W] -> float32 [G_PAD, BLOCK_N]."""
    if F32_DOT:
        kt = tl.trans(k.to(tl.float32))
        x = (tl.dot(qr_hi.to(tl.float32), kt, input_precision="ieee")
             + tl.dot(qr_lo.to(tl.float32), kt, input_precision="ieee"))
    elif HI_LO:
        kt = tl.trans(k)
        x = tl.dot(qr_hi, kt) + tl.dot(qr_lo, kt)
    else:  # int8 x int8 on the tensor cores, exact in int32: no int -> float conversions
        x = tl.dot(qr_hi, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    return x


@triton.jit
def _scores(qa_hi, qa_lo, qb_hi, qb_lo, c, mul, Keys, h, n, ok, stride_kh, stride_kn, scale,
            G, G_PAD: tl.constexpr, R: tl.constexpr, F32_DOT: tl.constexpr,
            HI_LO: tl.constexpr, KEY_BITS: tl.constexpr):
    """Scaled scores [G_PAD, BLOCK_N] of positions n (rows >= G and columns not ok: -inf).

    Float keys: two tensor-core dots, hi and lo halves of q @ basis against the exact keys,
    accumulate in float32: the score is float32-accurate to about 2**-16 of
    |q @ basis| |k|. Integer keys: q @ basis comes as int8 (ref.py, quantise_query) with
    its step mul, and one int8 dot scores it exactly. F32_DOT (float32 keys; the
    interpreter, whose low-precision dots are wrong in Triton 3.6) upcasts to float32."""
    g = tl.arange(0, G_PAD)
    row = Keys + h * stride_kh + n[:, None].to(tl.int64) * stride_kn
    if KEY_BITS == 4:
        b = tl.load(row + tl.arange(0, R // 2)[None, :], mask=ok[:, None], other=0)
        low = (b & 15).to(tl.int8) - 8  # dims [0, R/2)
        high = (b >> 4).to(tl.int8) - 8  # dims [R/2, R)
        x = _dot(qa_hi, qa_lo, low, F32_DOT, HI_LO) + _dot(qb_hi, qb_lo, high, F32_DOT, HI_LO)
    else:
        k = tl.load(row + tl.arange(0, R)[None, :], mask=ok[:, None], other=0)
        x = _dot(qa_hi, qa_lo, k, F32_DOT, HI_LO)
    x = (x * mul + c[:, None]) * scale
    return tl.where((g[:, None] < G) & ok[None, :], x, float("-inf"))


@triton.jit
def _merged_lse(M, L, h, S, stride_mh, stride_ms, G_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """Kv head h's S partial (max, sum) pairs [S, G_PAD] -> lse [G_PAD] (-inf if none)."""
    g = tl.arange(0, G_PAD)
    s = tl.arange(0, S_PAD)
    part = h * stride_mh + s[:, None] * stride_ms + g[None, :]
    pm = tl.load(M + part, mask=s[:, None] < S, other=float("-inf"))  # [S_PAD, G_PAD]
    pl = tl.load(L + part, mask=s[:, None] < S, other=0.0)
    mx = tl.max(pm, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.sum(pl * tl.exp(pm - mx_safe[None, :]), axis=0))


@triton.jit
def lse_partial_kernel(
    QrHi, QrLo, C, Mul, Keys, Hi, M, L,  # [Hkv, G, r] x2 dot dtype, [Hkv, G] f32, [Hkv] f32,
    # [Hkv, N, r] (r / 2 packed int4), [1], [Hkv, S, G_PAD] f32 x2
    lo, origin, N,  # first position scored, first position of tile 0, capacity
    stride_qh, stride_qg, stride_ch, stride_kh, stride_kn, stride_mh, stride_ms,
    scale, G,
    G_PAD: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
    CHUNK: tl.constexpr,  # positions per program, a multiple of BLOCK_N (fixed trip count)
    HI_LO: tl.constexpr,  # dot the lo half of q @ basis too (float keys)
    KEY_BITS: tl.constexpr,  # 16 (float keys), 8 (int8) or 4 (packed int4)
):
    h = tl.program_id(0).to(tl.int64)  # h * stride_kh passes 2**31 at B·Hkv·N·r >= 2**31
    split = tl.program_id(1)
    hi = tl.minimum(tl.load(Hi).to(tl.int32), N)
    qa_hi, qa_lo, qb_hi, qb_lo, c, mul = _queries(QrHi, QrLo, C, Mul, h, stride_qh, stride_qg,
                                                  stride_ch, G, G_PAD, R, KEY_BITS)
    start = origin + split * CHUNK
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    acc = tl.zeros([G_PAD], tl.float32)
    for off in range(0, CHUNK, BLOCK_N):
        n = start + off + tl.arange(0, BLOCK_N)
        x = _scores(qa_hi, qa_lo, qb_hi, qb_lo, c, mul, Keys, h, n, (n >= lo) & (n < hi),
                    stride_kh, stride_kn, scale, G, G_PAD, R, F32_DOT, HI_LO, KEY_BITS)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all excluded so far
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    g = tl.arange(0, G_PAD)
    tl.store(M + h * stride_mh + split * stride_ms + g, m)
    tl.store(L + h * stride_mh + split * stride_ms + g, acc)


@triton.jit
def shares_kernel(
    QrHi, QrLo, C, Mul, Keys, Hi, M, L, Other, Out, Lse,  # Other, Lse [Hkv, G]; Out [Hkv, N - lo]
    Mass,  # [Hkv, G, NM] float32, zeroed: sums of exp(score - lse) per MASS_CHUNK positions
    State, StateHi,  # ONE_PASS: [2, Hkv, G] float32 (previous step's, latest), [Hkv] int64
    lo, origin, N, S, NM, NB,
    stride_qh, stride_qg, stride_ch, stride_kh, stride_kn, stride_mh, stride_ms,
    stride_xh, stride_oh, stride_lh, stride_ah, stride_ag, stride_ts, stride_th,
    scale, G,
    G_PAD: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, S_PAD: tl.constexpr,
    HAS_OTHER: tl.constexpr, F32_DOT: tl.constexpr, CHUNK: tl.constexpr,
    MASS_CHUNK: tl.constexpr,  # 0: no Mass; else a power of two dividing BLOCK_N
    HI_LO: tl.constexpr, KEY_BITS: tl.constexpr,
    ONE_PASS: tl.constexpr,  # normalise by State (+ Other); write partials to M, L
    BLOCK: tl.constexpr,  # 1: Out [Hkv, N - lo] per position; else [Hkv, NB] block sums
):
    h = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    hi = tl.minimum(tl.load(Hi).to(tl.int32), N)
    g = tl.arange(0, G_PAD)
    if ONE_PASS:  # the lse known before the pass (State); this pass's partials go to M, L
        # a step of a new hi reads the latest lse, a repeat of the step the one before
        slot = (tl.load(StateHi + h) != tl.load(Hi).to(tl.int64)).to(tl.int64)
        lse = tl.load(State + slot * stride_ts + h * stride_th + g, mask=g < G,
                      other=float("-inf"))
    else:
        lse = _merged_lse(M, L, h, S, stride_mh, stride_ms, G_PAD, S_PAD)
    if HAS_OTHER:
        o = tl.load(Other + h * stride_xh + g, mask=g < G, other=float("-inf")).to(tl.float32)
        lse = log_add(lse, o)
    if split == 0:
        tl.store(Lse + h * stride_lh + g, lse, mask=g < G)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # no mass anywhere: shares 0
    qa_hi, qa_lo, qb_hi, qb_lo, c, mul = _queries(QrHi, QrLo, C, Mul, h, stride_qh, stride_qg,
                                                  stride_ch, G, G_PAD, R, KEY_BITS)
    start = origin + split * CHUNK  # origin is a multiple of BLOCK_N: tiles hold whole chunks
    # ONE_PASS: the largest score and the sum of p, kept per lane and reduced once after
    # the loop (a reduction across lanes per tile cost more than the scoring itself)
    m = tl.full([G_PAD, BLOCK_N], float("-inf"), tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_N], tl.float32)
    for off in range(0, CHUNK, BLOCK_N):
        n = start + off + tl.arange(0, BLOCK_N)
        x = _scores(qa_hi, qa_lo, qb_hi, qb_lo, c, mul, Keys, h, n, (n >= lo) & (n < hi),
                    stride_kh, stride_kn, scale, G, G_PAD, R, F32_DOT, HI_LO, KEY_BITS)
        p = tl.exp(x - lse[:, None])  # [G_PAD, BLOCK_N], 0 where excluded
        if ONE_PASS:
            acc += p
            m = tl.maximum(m, x)
        shares = tl.sum(p, axis=0)  # [BLOCK_N]
        if BLOCK == 1:
            out = shares.to(Out.dtype.element_ty, fp_downcast_rounding="rtne")  # f32 or bf16
            tl.store(Out + h * stride_oh + (n - lo), out, mask=(n >= lo) & (n < N))
        else:  # blocks [lo + j·P, lo + j·P + P): lo % P == 0, so a tile holds whole ones
            sums = tl.sum(tl.reshape(shares, (BLOCK_N // BLOCK, BLOCK)), axis=1)
            j = (start + off - lo) // BLOCK + tl.arange(0, BLOCK_N // BLOCK)
            whole = lo + (j + 1) * BLOCK <= hi
            out = tl.where(whole, sums, -1.0).to(Out.dtype.element_ty,
                                                 fp_downcast_rounding="rtne")
            tl.store(Out + h * stride_oh + j, out, mask=(j >= 0) & (j < NB))
        if MASS_CHUNK > 0:
            per = tl.sum(tl.reshape(p, (G_PAD, BLOCK_N // MASS_CHUNK, MASS_CHUNK)), axis=2)
            j = (start + off) // MASS_CHUNK + tl.arange(0, BLOCK_N // MASS_CHUNK)
            tl.store(Mass + h * stride_ah + g[:, None] * stride_ag + j[None, :], per,
                     mask=(g[:, None] < G) & (j[None, :] < NM))
    if ONE_PASS:  # partials: the largest score, and the sum of p in the frame of the lse
        # the shares used (Lse), so no second exp per score (the kernel is bound by its
        # arithmetic, not by the sketch's bytes: bench --scores)
        tl.store(M + h * stride_mh + split * stride_ms + g, tl.max(m, axis=1))
        tl.store(L + h * stride_mh + split * stride_ms + g, tl.sum(acc, axis=1))


@triton.jit
def lse_state_kernel(M, L, Lse, State, StateHi, Hi, S, stride_mh, stride_ms, stride_lh,
                     stride_ts, stride_th, G, G_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """After a one-pass shares_kernel at Hi, per kv head h (one program each): State[1, h]
    = the region's log-sum-exp from its partials (per query head), State[0, h] = the lse
    that pass read, StateHi[h] = Hi. The region's lse is the frame (Lse) + log(sum of p);
    where that is not finite (p overflowed or underflowed: scores over e**88 from the
    frame) the largest score, which is within log(N) of it. Each head keeps its own
    StateHi, so that a program reads it before it writes it."""
    h = tl.program_id(0).to(tl.int64)
    hi = tl.load(Hi).to(tl.int64)
    fresh = tl.load(StateHi + h) != hi  # else a repeat of the latest step (graph warm-up)
    g = tl.arange(0, G_PAD)
    s = tl.arange(0, S_PAD)
    row = State + h * stride_th + g
    used = tl.load(row + fresh.to(tl.int64) * stride_ts, mask=g < G)
    tl.store(row, used, mask=g < G)
    part = h * stride_mh + s[:, None] * stride_ms + g[None, :]
    mx = tl.max(tl.load(M + part, mask=s[:, None] < S, other=float("-inf")), axis=0)
    total = tl.sum(tl.load(L + part, mask=s[:, None] < S, other=0.0), axis=0)
    frame = tl.load(Lse + h * stride_lh + g, mask=g < G, other=0.0)
    ok = (total > 0) & (total < float("inf")) & (tl.abs(frame) < float("inf"))
    lse = tl.where(ok, frame + tl.log(tl.where(ok, total, 1.0)), mx)
    tl.store(row + stride_ts, lse, mask=g < G)
    tl.store(StateHi + h, hi)
