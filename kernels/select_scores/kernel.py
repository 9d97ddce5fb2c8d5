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
Quantised sketches (KEY_BITS 8: int8 keys; 4: two int4 per uint8 byte, kernels/formats.py) are
scored by int8 tensor-core dots against an int8 q @ basis: converting the keys to floats
instead costs more than reading them (H100, 1M tokens, 28 layers: 19.6 ms for int4 of rank
128 through float16, against 6.4 ms for bfloat16 of rank 32, the same bytes).
A dot needs 16 rows, and a kv head has few query heads (Llama-3 4, Qwen2.5 7): rather than
pad them to 16, one dot scores TILES tiles of BLOCK_N positions, its rows the (tile, head)
pairs, against a block-diagonal q @ basis (`_query`), so the exps and sums after it work on
real heads (3x fewer instructions at Llama, ncu; the pass is then bound by memory).
"""

import triton
import triton.language as tl

from retrieval_attn.kernels._jit import int4_nibbles, log_add


@triton.jit
def _rows(G_PAD: tl.constexpr, TILES: tl.constexpr):
    """Each row's query head and tile: row i·G_PAD + g scores head g at tile i."""
    row = tl.arange(0, TILES * G_PAD)
    return row % G_PAD, row // G_PAD


@triton.jit
def _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD: tl.constexpr,
           TILES: tl.constexpr, WIDTH: tl.constexpr, OFFSET: tl.constexpr):
    """Columns [OFFSET, OFFSET + WIDTH) of kv head h's q @ basis, as a (hi, lo) pair of
    block-diagonal [TILES·G_PAD, TILES·WIDTH]: row i·G_PAD + g holds head g's in columns
    [i·WIDTH, (i + 1)·WIDTH), zeros elsewhere, so one dot scores TILES tiles of positions
    against the G heads with no padding rows beyond G_PAD."""
    g, tile = _rows(G_PAD, TILES)
    col = tl.arange(0, TILES * WIDTH)
    mask = (tile[:, None] == (col // WIDTH)[None, :]) & (g < G)[:, None]
    off = h * stride_qh + g[:, None] * stride_qg + OFFSET + (col % WIDTH)[None, :]
    qr_hi = tl.load(QrHi + off, mask=mask, other=0.0)
    qr_lo = tl.load(QrLo + off, mask=mask, other=0.0)
    return qr_hi, qr_lo


@triton.jit
def _queries(QrHi, QrLo, C, Mul, h, stride_qh, stride_qg, stride_ch, G,
             G_PAD: tl.constexpr, TILES: tl.constexpr, R: tl.constexpr,
             KEY_BITS: tl.constexpr):
    """Kv head h's q @ basis as block-diagonal (hi, lo) pairs, split in halves for packed
    int4 keys (whose bytes hold dims j and j + R/2), q·mean per row and the scores'
    multiplier, and what _raw_scores takes out of each raw score: packed int4 keys are
    dotted as their stored nibbles n = v + 8 in [0, 15], so 8 · sum_j q_j per row (0
    otherwise). Taken out of the integer dot, which stays exact, rather than folded into
    the constant, where the product with the step would be rounded."""
    if KEY_BITS == 4:
        qa_hi, qa_lo = _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD, TILES, R // 2, 0)
        qb_hi, qb_lo = _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD, TILES, R // 2,
                              R // 2)
    else:
        qa_hi, qa_lo = _query(QrHi, QrLo, h, stride_qh, stride_qg, G, G_PAD, TILES, R, 0)
        qb_hi, qb_lo = qa_hi, qa_lo  # unused
    g, _ = _rows(G_PAD, TILES)
    c = tl.load(C + h * stride_ch + g, mask=g < G, other=0.0)
    if KEY_BITS == 16:
        mul = 1.0  # float keys: Mul is unread
    else:
        mul = tl.load(Mul + h)
    if KEY_BITS == 4:  # the int8 query is the hi half alone (lo: a stand-in for it);
        # integers, exact in float32 (|8 · sum| < 2**24)
        offset = 8.0 * (tl.sum(qa_hi.to(tl.float32), axis=1)
                        + tl.sum(qb_hi.to(tl.float32), axis=1))
    else:
        offset = tl.zeros([TILES * G_PAD], tl.float32)
    return qa_hi, qa_lo, qb_hi, qb_lo, c, mul, offset


@triton.jit
def _dot(qr_hi, qr_lo, k, F32_DOT: tl.constexpr, HI_LO: tl.constexpr):
    """[ROWS, W] x keys [BLOCK_N, W] -> float32 [ROWS, BLOCK_N]."""
    if F32_DOT:
        kt = tl.trans(k.to(tl.float32))
        x = tl.dot(qr_hi.to(tl.float32), kt, input_precision="ieee")
        if HI_LO:  # float keys; an integer query is its hi half (lo: a stand-in for it)
            x += tl.dot(qr_lo.to(tl.float32), kt, input_precision="ieee")
    elif HI_LO:
        kt = tl.trans(k)
        x = tl.dot(qr_hi, kt) + tl.dot(qr_lo, kt)
    else:  # int8 x int8 on the tensor cores, exact in int32: no int -> float conversions
        x = tl.dot(qr_hi, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    return x


@triton.jit
def _raw_scores(qa_hi, qa_lo, qb_hi, qb_lo, offset, Keys, h, n0, lo, hi, stride_kh,
                stride_kn, BLOCK_N: tl.constexpr, TILES: tl.constexpr, R: tl.constexpr,
                F32_DOT: tl.constexpr, HI_LO: tl.constexpr, KEY_BITS: tl.constexpr):
    """q @ basis · keys [ROWS, BLOCK_N] of TILES tiles of BLOCK_N positions from n0 (row
    i·G_PAD + g, column n: head g at position n0 + i·BLOCK_N + n), before the step, mean
    and scale; keys outside [lo, hi) read as 0.

    Float keys: two tensor-core dots, hi and lo halves of q @ basis against the exact keys,
    accumulate in float32: the score is float32-accurate to about 2**-16 of
    |q @ basis| |k|. Integer keys: q @ basis comes as int8 (ref.py, quantize_query) with
    its step, and one int8 dot scores it exactly. F32_DOT (float32 keys; the interpreter,
    whose low-precision dots are wrong in Triton 3.6) upcasts to float32."""
    W: tl.constexpr = R // 2 if KEY_BITS == 4 else R  # stored values per position
    n = tl.arange(0, BLOCK_N)
    col = tl.arange(0, TILES * W)
    # [BLOCK_N, TILES·W]: column i·W + j holds value j of position n0 + i·BLOCK_N + n
    pos = n0 + (col // W)[None, :] * BLOCK_N + n[:, None]
    ok = (pos >= lo) & (pos < hi)
    k = tl.load(Keys + h * stride_kh + pos.to(tl.int64) * stride_kn + (col % W)[None, :],
                mask=ok, other=0)
    if KEY_BITS == 4:  # the stored nibbles v + 8 (offset takes the 8s out: _queries)
        low, high = int4_nibbles(k, F32_DOT)  # dims [0, R/2), [R/2, R); F32_DOT: interpreter
        x = (_dot(qa_hi, qa_lo, low, F32_DOT, HI_LO) + _dot(qb_hi, qb_lo, high, F32_DOT, HI_LO)
             - offset[:, None])  # integers below 2**24 in float32: exact
    else:
        x = _dot(qa_hi, qa_lo, k, F32_DOT, HI_LO)
    return x


@triton.jit
def _in_range(n0, lo, hi, G, BLOCK_N: tl.constexpr, G_PAD: tl.constexpr,
              TILES: tl.constexpr):
    """[ROWS, BLOCK_N]: whether row and column score a real head at a position in [lo, hi)."""
    g, tile = _rows(G_PAD, TILES)
    pos = n0 + tile[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return (pos >= lo) & (pos < hi) & (g < G)[:, None]


@triton.jit
def _merged_lse(M, L, h, S, stride_mh, stride_ms, G_PAD: tl.constexpr, TILES: tl.constexpr,
                S_PAD: tl.constexpr):
    """Kv head h's S partial (max, sum) pairs [S, G_PAD] -> lse per row [ROWS] (-inf if
    none)."""
    g, _ = _rows(G_PAD, TILES)
    s = tl.arange(0, S_PAD)
    part = h * stride_mh + s[:, None] * stride_ms + g[None, :]
    pm = tl.load(M + part, mask=s[:, None] < S, other=float("-inf"))  # [S_PAD, ROWS]
    pl = tl.load(L + part, mask=s[:, None] < S, other=0.0)
    mx = tl.max(pm, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.sum(pl * tl.exp(pm - mx_safe[None, :]), axis=0))


@triton.jit
def _head_max(x, G_PAD: tl.constexpr, TILES: tl.constexpr):
    """[ROWS] -> [G_PAD]: the largest over each head's TILES rows."""
    return tl.max(tl.reshape(x, (TILES, G_PAD)), axis=0)


@triton.jit
def _head_sum(x, G_PAD: tl.constexpr, TILES: tl.constexpr):
    """[ROWS] -> [G_PAD]: the sum over each head's TILES rows."""
    return tl.sum(tl.reshape(x, (TILES, G_PAD)), axis=0)


@triton.jit
def lse_partial_kernel(
    QrHi, QrLo, C, Mul, Keys, Hi, M, L,  # [Hkv, G, r] x2 dot dtype, [Hkv, G] f32, [Hkv] f32,
    # [Hkv, N, r] (r / 2 packed int4), [1], [Hkv, S, G_PAD] f32 x2
    lo, origin, N,  # first position scored, first position of tile 0, capacity
    stride_qh, stride_qg, stride_ch, stride_kh, stride_kn, stride_mh, stride_ms,
    scale, G,
    G_PAD: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
    CHUNK: tl.constexpr,  # positions per program, a multiple of TILES·BLOCK_N
    HI_LO: tl.constexpr,  # dot the lo half of q @ basis too (float keys)
    KEY_BITS: tl.constexpr,  # 16 (float keys), 8 (int8) or 4 (packed int4)
    TILES: tl.constexpr,  # tiles of BLOCK_N positions scored by one dot
):
    h = tl.program_id(0).to(tl.int64)  # h * stride_kh passes 2**31 at B·Hkv·N·r >= 2**31
    split = tl.program_id(1)
    hi = tl.minimum(tl.load(Hi).to(tl.int32), N)
    qa_hi, qa_lo, qb_hi, qb_lo, c, mul, offset = _queries(
        QrHi, QrLo, C, Mul, h, stride_qh, stride_qg, stride_ch, G, G_PAD, TILES, R, KEY_BITS)
    start = origin + split * CHUNK
    m = tl.full([TILES * G_PAD], float("-inf"), tl.float32)
    acc = tl.zeros([TILES * G_PAD], tl.float32)
    for off in range(0, CHUNK, TILES * BLOCK_N):
        x = _raw_scores(qa_hi, qa_lo, qb_hi, qb_lo, offset, Keys, h, start + off, lo, hi,
                        stride_kh, stride_kn, BLOCK_N, TILES, R, F32_DOT, HI_LO, KEY_BITS)
        x = tl.where(_in_range(start + off, lo, hi, G, BLOCK_N, G_PAD, TILES),
                     (x * mul + c[:, None]) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all excluded so far
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    # each head's TILES rows -> one (max, sum) pair
    mh = _head_max(m, G_PAD, TILES)
    mh_safe = tl.where(mh == float("-inf"), 0.0, mh)
    rows_m = tl.reshape(m, (TILES, G_PAD))
    lh = tl.sum(tl.reshape(acc, (TILES, G_PAD)) * tl.exp(rows_m - mh_safe[None, :]), axis=0)
    g = tl.arange(0, G_PAD)
    tl.store(M + h * stride_mh + split * stride_ms + g, mh)
    tl.store(L + h * stride_mh + split * stride_ms + g, lh)


@triton.jit
def shares_kernel(
    QrHi, QrLo, C, Mul, Keys, Hi, M, L, Other, Out, Lse,  # Other, Lse [Hkv, G]; Out [Hkv, N - lo]
    Mass,  # [Hkv, G, NM] float32, zeroed: sums of exp(score - lse) per MASS_CHUNK positions
    State, StateHi,  # ONE_PASS: [2, Hkv, G] float32 (previous step's, latest), [Hkv] int64
    Sums, PartT, PartTM,  # TAIL: V chunk sums [Hkv, >= NM, D] f32; [Hkv, S, G_PAD, D],
    # [Hkv, S, G_PAD] f32: per split, sum_c mass_gc · Sums_c / MASS_CHUNK and sum_c mass_gc
    lo, origin, N, S, NM, NB,
    stride_qh, stride_qg, stride_ch, stride_kh, stride_kn, stride_mh, stride_ms,
    stride_xh, stride_oh, stride_lh, stride_ah, stride_ag, stride_ts, stride_th,
    stride_sh, stride_sc, stride_pth, stride_pts, stride_ptg, stride_pmh, stride_pms,
    scale, G,
    G_PAD: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, S_PAD: tl.constexpr,
    HAS_OTHER: tl.constexpr, F32_DOT: tl.constexpr, CHUNK: tl.constexpr,
    MASS_CHUNK: tl.constexpr,  # 0: no Mass; else a power of two dividing BLOCK_N
    HI_LO: tl.constexpr, KEY_BITS: tl.constexpr,
    ONE_PASS: tl.constexpr,  # normalise by State (+ Other); write partials to M, L
    BLOCK: tl.constexpr,  # 1: Out [Hkv, N - lo] per position; else [Hkv, NB] block sums
    TILES: tl.constexpr,  # tiles of BLOCK_N positions scored by one dot
    TAIL: tl.constexpr,  # the tail's chunk term (Sums, PartT, PartTM; needs MASS_CHUNK)
    D: tl.constexpr,  # head dim of Sums (TAIL)
):
    h = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    hi = tl.minimum(tl.load(Hi).to(tl.int32), N)
    g, tile = _rows(G_PAD, TILES)  # per row
    if ONE_PASS:  # the lse known before the pass (State); this pass's partials go to M, L
        # a step of a new hi reads the latest lse, a repeat of the step the one before
        slot = (tl.load(StateHi + h) != tl.load(Hi).to(tl.int64)).to(tl.int64)
        lse = tl.load(State + slot * stride_ts + h * stride_th + g, mask=g < G,
                      other=float("-inf"))
    else:
        lse = _merged_lse(M, L, h, S, stride_mh, stride_ms, G_PAD, TILES, S_PAD)
    if HAS_OTHER:
        o = tl.load(Other + h * stride_xh + g, mask=g < G, other=float("-inf")).to(tl.float32)
        lse = log_add(lse, o)
    if split == 0:
        tl.store(Lse + h * stride_lh + g, lse, mask=(g < G) & (tile == 0))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # no mass anywhere: shares 0
    qa_hi, qa_lo, qb_hi, qb_lo, c, mul, offset = _queries(
        QrHi, QrLo, C, Mul, h, stride_qh, stride_qg, stride_ch, G, G_PAD, TILES, R, KEY_BITS)
    # p = exp(score - lse) = exp2(raw · a + b): one multiply-add per score; rows of no head
    # (g >= G) have lse inf, so b -inf and p 0 with no mask
    LOG2E: tl.constexpr = 1.4426950408889634
    a = mul * scale * LOG2E
    b = (c * scale - lse) * LOG2E  # [ROWS]
    start = origin + split * CHUNK  # origin is a multiple of BLOCK_N: tiles hold whole chunks
    STEP: tl.constexpr = TILES * BLOCK_N
    # ONE_PASS: the largest raw score and the sum of p, kept per lane and reduced once
    # after the loop (a reduction across lanes per tile cost more than the scoring itself)
    m = tl.full([TILES * G_PAD, BLOCK_N], float("-inf"), tl.float32)
    acc = tl.zeros([TILES * G_PAD, BLOCK_N], tl.float32)
    tail = tl.zeros([G_PAD, D], tl.float32)  # TAIL: sum_c mass_gc · Sums_c
    tail_m = tl.zeros([G_PAD], tl.float32)  # TAIL: sum_c mass_gc
    if TAIL:  # the V sums are loaded a step ahead: unlike the keys (which feed a dot) the
        # compiler does not pipeline them, and their latency was waited out every step.
        # Chunks past this program's positions read nothing (the last step's prefetch)
        nm_here = tl.minimum(NM, (start + CHUNK) // MASS_CHUNK)
        v_next = _chunk_sums(Sums, h, start, nm_here, stride_sh, stride_sc, BLOCK_N, TILES,
                             MASS_CHUNK, D)
    for off in range(0, CHUNK, STEP):
        n0 = start + off
        if TAIL:
            v = v_next
            v_next = _chunk_sums(Sums, h, n0 + STEP, nm_here, stride_sh, stride_sc, BLOCK_N,
                                 TILES, MASS_CHUNK, D)
        x = _raw_scores(qa_hi, qa_lo, qb_hi, qb_lo, offset, Keys, h, n0, lo, hi, stride_kh,
                        stride_kn, BLOCK_N, TILES, R, F32_DOT, HI_LO, KEY_BITS)
        y = x * a + b[:, None]
        if (n0 < lo) | (n0 + STEP > hi):  # a tile at an edge of [lo, hi)
            ok = _in_range(n0, lo, hi, G, BLOCK_N, G_PAD, TILES)
            y = tl.where(ok, y, float("-inf"))
            x = tl.where(ok, x, float("-inf"))
        p = tl.exp2(y)  # [ROWS, BLOCK_N], 0 where excluded
        if ONE_PASS:
            acc += p
            m = tl.maximum(m, x)
        _store_shares(Out, p, h, n0, lo, hi, N, NB, stride_oh, BLOCK_N, G_PAD, TILES, BLOCK)
        if TAIL:
            per = _chunk_mass(p, G_PAD, TILES, BLOCK_N, MASS_CHUNK)  # [TILES, G_PAD, PER]
            tail += _chunk_tail(per, v)
            tail_m += tl.sum(tl.sum(per, axis=2), axis=0)
        elif MASS_CHUNK > 0:
            _store_mass(Mass, p, h, n0, G, NM, stride_ah, stride_ag, BLOCK_N, G_PAD, TILES,
                        MASS_CHUNK)
    if ONE_PASS:  # partials: the largest score, and the sum of p in the frame of the lse
        # the shares used (Lse), so no second exp per score (when this was written the
        # pass was bound by its arithmetic; since tiles of heads it is bound by the
        # sketch's bytes, ncu)
        mx = tl.max(m, axis=1)  # raw; the step and scale are positive
        mx = tl.where(g < G, (mx * mul + c) * scale, float("-inf"))
        gh = tl.arange(0, G_PAD)
        tl.store(M + h * stride_mh + split * stride_ms + gh, _head_max(mx, G_PAD, TILES))
        tl.store(L + h * stride_mh + split * stride_ms + gh,
                 _head_sum(tl.sum(acc, axis=1), G_PAD, TILES))
    if TAIL:  # a chunk with mass is full: the window (>= MASS_CHUNK tokens) follows it
        gh = tl.arange(0, G_PAD)
        tl.store(PartT + h * stride_pth + split * stride_pts + gh[:, None] * stride_ptg
                 + tl.arange(0, D)[None, :], tail * (1.0 / MASS_CHUNK))
        tl.store(PartTM + h * stride_pmh + split * stride_pms + gh, tail_m)


@triton.jit
def _store_shares(Out, p, h, n0, lo, hi, N, NB, stride_oh, BLOCK_N: tl.constexpr,
                  G_PAD: tl.constexpr, TILES: tl.constexpr, BLOCK: tl.constexpr):
    """Each position's sum over its heads of p [ROWS, BLOCK_N], or with BLOCK > 1 the sums
    per block [lo + j·P, lo + j·P + P) (lo % P == 0, so a tile holds whole ones; -1 for
    blocks not wholly before hi)."""
    shares = tl.sum(tl.reshape(p, (TILES, G_PAD, BLOCK_N)), axis=1)  # [TILES, BLOCK_N]
    tile = tl.arange(0, TILES)[:, None]
    if BLOCK == 1:
        pos = n0 + tile * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        out = shares.to(Out.dtype.element_ty, fp_downcast_rounding="rtne")  # f32 or bf16
        tl.store(Out + h * stride_oh + (pos - lo), out, mask=(pos >= lo) & (pos < N))
    else:
        sums = tl.sum(tl.reshape(shares, (TILES, BLOCK_N // BLOCK, BLOCK)), axis=2)
        first = n0 + tile * BLOCK_N + tl.arange(0, BLOCK_N // BLOCK)[None, :] * BLOCK
        j = (first - lo) // BLOCK  # exact: first and lo are multiples of BLOCK
        out = tl.where(first + BLOCK <= hi, sums, -1.0).to(Out.dtype.element_ty,
                                                         fp_downcast_rounding="rtne")
        tl.store(Out + h * stride_oh + j, out, mask=(first >= lo) & (j < NB))


@triton.jit
def _chunk_mass(p, G_PAD: tl.constexpr, TILES: tl.constexpr, BLOCK_N: tl.constexpr,
                MASS_CHUNK: tl.constexpr):
    """p [ROWS, BLOCK_N] -> each head's sum per chunk of MASS_CHUNK positions
    [TILES, G_PAD, BLOCK_N // MASS_CHUNK]."""
    return tl.sum(tl.reshape(p, (TILES, G_PAD, BLOCK_N // MASS_CHUNK, MASS_CHUNK)), axis=3)


@triton.jit
def _store_mass(Mass, p, h, n0, G, NM, stride_ah, stride_ag, BLOCK_N: tl.constexpr,
                G_PAD: tl.constexpr, TILES: tl.constexpr, MASS_CHUNK: tl.constexpr):
    """Each head's sum of p [ROWS, BLOCK_N] per chunk of MASS_CHUNK positions."""
    PER: tl.constexpr = BLOCK_N // MASS_CHUNK  # chunks a tile
    per = _chunk_mass(p, G_PAD, TILES, BLOCK_N, MASS_CHUNK)
    tile = tl.arange(0, TILES)[:, None, None]
    g = tl.arange(0, G_PAD)[None, :, None]
    j = (n0 + tile * BLOCK_N) // MASS_CHUNK + tl.arange(0, PER)[None, None, :]
    tl.store(Mass + h * stride_ah + g * stride_ag + j, per, mask=(g < G) & (j < NM))


@triton.jit
def _chunk_sums(Sums, h, n0, NM, stride_sh, stride_sc, BLOCK_N: tl.constexpr,
                TILES: tl.constexpr, MASS_CHUNK: tl.constexpr, D: tl.constexpr):
    """The V chunk sums of a step's chunks [TILES, PER, D] (0, unread, from chunk NM)."""
    PER: tl.constexpr = BLOCK_N // MASS_CHUNK
    j = ((n0 + tl.arange(0, TILES) * BLOCK_N) // MASS_CHUNK)[:, None] + tl.arange(0, PER)[None, :]
    return tl.load(Sums + h * stride_sh + j[:, :, None].to(tl.int64) * stride_sc
                   + tl.arange(0, D)[None, None, :], mask=(j < NM)[:, :, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _chunk_tail(per, v):
    """sum over a step's chunks c of per [TILES, G_PAD, PER] (mass_gc) times the V chunk
    sums v [TILES, PER, D] (Sums_c) -> [G_PAD, D]."""
    x = per[:, :, :, None] * v[:, None, :, :]  # [TILES, G_PAD, PER, D]
    return tl.sum(tl.sum(x, axis=2), axis=0)


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
