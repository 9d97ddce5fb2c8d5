"""Triton kernels: split-K decode attention over two KV sources, then a log-sum-exp merge.

`sparse_attention_split_kernel`: program (b*Hkv + kv head, split) attends the G query heads of
one kv head over one chunk of one source (splits [0, SPLITS_A) cover source a, the rest
source b), so every K/V row is read once for all G heads. Source b may be rows of an int8
store read by index (INDEXED), dequantised in registers: no gathered copy is written. It
writes a partial (max, sum, unnormalised acc) per query head, in log2 units, into one
float32 buffer `Part` of R = B*H*S rows: acc at Part[r*D : r*D + D], max at
Part[R*D + r], sum at Part[R*D + R + r], with r = (b*H + h)*S + split.

`sparse_attention_merge_kernel`: program (b*H + head) rescales the partials of all splits by
their maxima (one softmax over both sources) and writes out and the natural-log lse.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_rows(q, k_base, v_base, stride_kn, stride_vn, lo, hi, idx_base, ks_base, vs_base,
                 qk_scale, G_PAD: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK_N: tl.constexpr, INDEXED: tl.constexpr, ROW_DTYPE: tl.constexpr,
                 DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of q [G_PAD, D] over tokens [lo, hi) of one chunk -> (max, sum,
    unnormalised acc), in log2 units. INDEXED: token n is row idx[n] of int8 rows, times
    that row's scale, rounded to ROW_DTYPE (what gather_kv makes of a quantised store)."""
    cols = tl.arange(0, D)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    # A fixed trip count (CHUNK is constexpr) rather than range(lo, hi): it pipelines, and
    # Triton's interpreter cannot use run-time loop bounds. Tiles at or past `hi` load
    # nothing (masked) and add nothing (p = 0); the max is guarded against -inf.
    for start in range(0, CHUNK, BLOCK_N):
        n = lo + start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        row = n.to(tl.int64)
        if INDEXED:
            row = tl.load(idx_base + n, mask=n_ok, other=0).to(tl.int64)
        # Masked loads read nothing past the valid length: garbage (NaN, huge) never enters.
        k = tl.load(k_base + row[:, None] * stride_kn + cols[None, :], mask=n_ok[:, None],
                    other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_base + row[:, None] * stride_vn + cols[None, :], mask=n_ok[:, None],
                    other=0.0)
        if INDEXED:
            ks = tl.load(ks_base + row, mask=n_ok, other=0.0).to(tl.float32)
            vs = tl.load(vs_base + row, mask=n_ok, other=0.0).to(tl.float32)
            k = (k.to(tl.float32) * ks[:, None]).to(ROW_DTYPE)
            v = (v.to(tl.float32) * vs[:, None]).to(ROW_DTYPE)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid token seen yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def sparse_attention_split_kernel(
    Q,  # [B, H, D]
    KA, VA, LenA,  # [B, Hkv, Na, D] x2, [B]
    KB, VB, LenB,  # [B, Hkv, Nb, D] x2, [B]; INDEXED: int8 rows [B, Hkv, N, D] x2
    IdxB, KSB, VSB,  # INDEXED: rows of source b [B, Hkv, Nb], row scales [B, Hkv, N] x2
    Part,  # float32 partials, layout above
    sm_scale,
    Na, Nb, HKV, B_H,  # B_H = B*H
    SPLITS_A, SPLITS,  # splits over source a; splits in all
    stride_qb, stride_qh,
    stride_kab, stride_kah, stride_kan,
    stride_vab, stride_vah, stride_van,
    stride_kbb, stride_kbh, stride_kbn,
    stride_vbb, stride_vbh, stride_vbn,
    stride_ib, stride_ih, stride_sb, stride_sh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,  # tokens per split, a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,
    INDEXED: tl.constexpr,  # source b read by index from an int8 store (IdxB, scales)
    DOT_F32: tl.constexpr,  # dots in float32 ("ieee"), else in the input dtype
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)

    g = tl.arange(0, G_PAD)
    g_ok = g < G
    cols = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + (kvh * G + g)[:, None] * stride_qh + cols[None, :],
                mask=g_ok[:, None], other=0.0)  # [G_PAD, D]; padded heads are zero
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax in base 2

    # Which source and which token range [lo, hi) of it this program covers.
    if split < SPLITS_A:
        n_valid = tl.minimum(tl.load(LenA + b).to(tl.int32), Na)
        lo = split * CHUNK
    else:
        n_valid = tl.minimum(tl.load(LenB + b).to(tl.int32), Nb)
        lo = (split - SPLITS_A) * CHUNK
    hi = tl.minimum(lo + CHUNK, n_valid)

    if not INDEXED:  # both sources alike: one loop (one pipeline's shared memory)
        if split < SPLITS_A:
            k_base = KA + b * stride_kab + kvh * stride_kah
            v_base = VA + b * stride_vab + kvh * stride_vah
            stride_kn = stride_kan
            stride_vn = stride_van
        else:
            k_base = KB + b * stride_kbb + kvh * stride_kbh
            v_base = VB + b * stride_vbb + kvh * stride_vbh
            stride_kn = stride_kbn
            stride_vn = stride_vbn
        m_i, l_i, acc = _attend_rows(
            q, k_base, v_base, stride_kn, stride_vn, lo, hi, LenA, LenA, LenA, qk_scale,
            G_PAD, D, CHUNK, BLOCK_N, False, Q.dtype.element_ty, DOT_F32, DOT_PRECISION)
    elif split < SPLITS_A:  # int8 rows and float window rows: a loop for each
        m_i, l_i, acc = _attend_rows(
            q, KA + b * stride_kab + kvh * stride_kah, VA + b * stride_vab + kvh * stride_vah,
            stride_kan, stride_van, lo, hi, LenA, LenA, LenA, qk_scale, G_PAD, D, CHUNK,
            BLOCK_N, False, Q.dtype.element_ty, DOT_F32, DOT_PRECISION)
    else:
        m_i, l_i, acc = _attend_rows(
            q, KB + b * stride_kbb + kvh * stride_kbh, VB + b * stride_vbb + kvh * stride_vbh,
            stride_kbn, stride_vbn, lo, hi, IdxB + b * stride_ib + kvh * stride_ih,
            KSB + b * stride_sb + kvh * stride_sh, VSB + b * stride_sb + kvh * stride_sh,
            qk_scale, G_PAD, D, CHUNK, BLOCK_N, True, Q.dtype.element_ty, DOT_F32,
            DOT_PRECISION)

    # Partials of query head kvh*G + g, split `split`; an empty split leaves (-inf, 0, 0).
    rows = B_H * SPLITS
    r = ((b * HKV + kvh) * G + g) * SPLITS + split
    tl.store(Part + r[:, None] * D + cols[None, :], acc, mask=g_ok[:, None])
    tl.store(Part + rows * D + r, m_i, mask=g_ok)
    tl.store(Part + rows * D + rows + r, l_i, mask=g_ok)


@triton.jit
def sparse_attention_merge_kernel(
    Part,  # float32 partials, layout above
    Out, Lse,  # [B, H, D], [B, H]
    H, B_H, SPLITS,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    D: tl.constexpr,
    S_TILE: tl.constexpr,  # partials read per iteration
    S_TILES: tl.constexpr,  # iterations: S_TILES * S_TILE >= SPLITS
):
    row = tl.program_id(0)
    b = row // H
    h = row % H
    cols = tl.arange(0, D)
    rows = B_H * SPLITS
    # Online over tiles of partials (a dense cache of 1M tokens has hundreds of splits):
    # running max m_run, sum l_run and acc [D], each rescaled when the max grows.
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for t in range(S_TILES):
        s = t * S_TILE + tl.arange(0, S_TILE)
        s_ok = s < SPLITS
        r = row * SPLITS + s
        part = tl.load(Part + r[:, None] * D + cols[None, :], mask=s_ok[:, None], other=0.0)
        m = tl.load(Part + rows * D + r, mask=s_ok, other=float("-inf"))
        l_part = tl.load(Part + rows * D + rows + r, mask=s_ok, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        # no non-empty split yet: keep the reference at 0 so that exp2 sees no inf - inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)  # 0 while nothing was seen (m_run = -inf)
        w = tl.exp2(m - m_ref)  # 0 for empty splits
        l_run = l_run * alpha + tl.sum(l_part * w, axis=0)
        acc = acc * alpha + tl.sum(part * w[:, None], axis=0)
        m_run = m_new
    # Both lengths 0 for this row: every split is empty; give out = 0, lse = -inf.
    m_ref = tl.where(m_run == float("-inf"), 0.0, m_run)
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    lse = (m_ref + tl.log2(l_run)) * 0.6931471805599453  # back to natural log
    tl.store(Out + b * stride_ob + h * stride_oh + cols, out.to(Out.dtype.element_ty))
    tl.store(Lse + b * stride_lb + h * stride_lh + tl.arange(0, 1), lse)
