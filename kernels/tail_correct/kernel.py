"""Triton kernels: the tail estimate's correction of a decode step, in two launches.

`tail_partials_kernel` sums, per kv-head row, mass_c / filled_c · sums_c over a split of
the chunks (programs s < n_splits) and subtracts the selected tokens' own sketch mass
p_i / filled_c(i) · sums_c(i) (programs s >= n_splits, one block of selected tokens each);
`tail_merge_kernel` (one program per row and head) adds the partials up and merges the
tail into the exact output. The chunks' partials may come from elsewhere instead:
select_scores sums them in its pass over the sketch (tail_sums), and then only the
selected tokens' programs run here. The reference (ref.py) takes the selected mass out
of each chunk and clamps it at 0 first; here the two sums are apart, which differs only
where a chunk's float32 masses round below what was taken out of it.
"""

import triton
import triton.language as tl

from retrieval_attn.kernels._jit import log_add


@triton.jit
def _filled(pos, c, CHUNK: tl.constexpr):
    """Tokens in chunk c so far (at least 1): its V sum over that many, float32."""
    return tl.minimum(tl.maximum(pos + 1 - c * CHUNK, 1), CHUNK).to(tl.float32)


@triton.jit
def tail_partials_kernel(
    Mass, Sums, Sel, SelScores, Count, Total, Pos, PartT, PartM,
    Mm, K, G, scale, n_splits,
    stride_mr, stride_mg, stride_sr, stride_sm, stride_selr, stride_ssr, stride_ssg,
    stride_tr, stride_ptr, stride_pts, stride_ptg, stride_pmr, stride_pms,
    D: tl.constexpr, G_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    PER_SPLIT: tl.constexpr,  # chunks per split (a loop bound: constexpr for the interpreter)
    DOT_PRECISION: tl.constexpr,  # of the float32 dots: "ieee", or "tf32x3" (tensor cores)
):
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    j = tl.arange(0, BLOCK)
    pos = tl.load(Pos).to(tl.int64)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    acc_m = tl.zeros((G_PAD,), dtype=tl.float32)
    if s < n_splits:  # the sketch's mass of a split of the chunks
        first = s.to(tl.int64) * PER_SPLIT
        for t in range(0, PER_SPLIT, BLOCK):
            c = first + t + j
            ok = (c < Mm) & (t + j < PER_SPLIT)
            m = tl.load(Mass + r * stride_mr + g[:, None] * stride_mg + c[None, :],
                        mask=(g[:, None] < G) & ok[None, :], other=0.0)  # [G_PAD, BLOCK]
            v = tl.load(Sums + r * stride_sr + c[:, None] * stride_sm + d[None, :],
                        mask=ok[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
            acc += tl.dot(m / _filled(pos, c, CHUNK)[None, :], v, input_precision=DOT_PRECISION)
            acc_m += tl.sum(m, axis=1)
    else:  # minus the sketch's mass of a block of the selected tokens (attended exactly)
        i = (s - n_splits) * BLOCK + j
        ok = (i < K) & (i < tl.load(Count))
        both = (g[:, None] < G) & ok[None, :]
        sc = tl.load(SelScores + r * stride_ssr + g[:, None] * stride_ssg + i[None, :],
                     mask=both, other=0.0)  # [G_PAD, BLOCK]
        total = tl.load(Total + r * stride_tr + g, mask=g < G, other=0.0)
        p = tl.where(both, tl.exp(sc * scale - total[:, None]), 0.0)
        c = tl.load(Sel + r * stride_selr + i, mask=ok, other=0).to(tl.int64) // CHUNK
        v = tl.load(Sums + r * stride_sr + c[:, None] * stride_sm + d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        acc -= tl.dot(p / _filled(pos, c, CHUNK)[None, :], v, input_precision=DOT_PRECISION)
        acc_m -= tl.sum(p, axis=1)
    tl.store(PartT + r * stride_ptr + s * stride_pts + g[:, None] * stride_ptg + d[None, :],
             acc)
    tl.store(PartM + r * stride_pmr + s * stride_pms + g, acc_m)


@triton.jit
def _sum_parts(PartT, PartM, r, g, stride_ptr, stride_pts, stride_ptg, stride_pmr,
               stride_pms, D: tl.constexpr, N_PARTS: tl.constexpr, PARTS_TILE: tl.constexpr):
    """Head g of row r: the sums over N_PARTS partials of the tail [D] and its mass [1]."""
    d = tl.arange(0, D)
    tail = tl.zeros((D,), dtype=tl.float32)
    mass = tl.zeros((1,), dtype=tl.float32)
    for t in range(0, N_PARTS, PARTS_TILE):
        s = t + tl.arange(0, PARTS_TILE)
        ok = s < N_PARTS
        tile = tl.load(PartT + r * stride_ptr + s[:, None] * stride_pts + g * stride_ptg
                       + d[None, :], mask=ok[:, None], other=0.0)  # [PARTS_TILE, D]
        tail += tl.sum(tile, axis=0)
        mass += tl.sum(tl.load(PartM + r * stride_pmr + s * stride_pms + g, mask=ok,
                               other=0.0), axis=0)
    return tail, mass


@triton.jit
def tail_merge_kernel(
    Out, LseAtt, Total, PartT, PartM, SelT, SelM, Res, GuessLse, G,
    stride_or, stride_og, stride_lr, stride_tr,
    stride_ptr, stride_pts, stride_ptg, stride_pmr, stride_pms,
    stride_str, stride_sts, stride_stg, stride_smr, stride_sms,
    stride_rr, stride_rg, stride_gr,
    D: tl.constexpr,
    N_CHUNK: tl.constexpr,  # the chunks' partials (a loop bound: constexpr)
    N_SEL: tl.constexpr,  # the selected tokens' partials
    PARTS_TILE: tl.constexpr,  # partials read per step
    HAS_GUESS: tl.constexpr,  # the exact part's lse from the guess (LseAtt unread)
):
    """Part*: the chunks' partials, Sel*: the selected tokens' (their mass negated)."""
    # one program per (row, head): the partials of a row are summed by G programs at once
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, D)
    tail, mass = _sum_parts(PartT, PartM, r, g, stride_ptr, stride_pts, stride_ptg,
                            stride_pmr, stride_pms, D, N_CHUNK, PARTS_TILE)
    sel_t, picked = _sum_parts(SelT, SelM, r, g, stride_str, stride_sts, stride_stg,
                               stride_smr, stride_sms, D, N_SEL, PARTS_TILE)
    tail += sel_t
    mass += picked  # picked: minus the selected tokens' sketch mass
    out = tl.load(Out + r * stride_or + g * stride_og + d).to(tl.float32)
    total = tl.load(Total + r * stride_tr + g + tl.arange(0, 1))
    if HAS_GUESS:
        # log-add the guess's window lse and the selected tokens' sketch lse, which is
        # total + log(their mass relative to total); no mass (nothing selected): -inf
        a = tl.load(GuessLse + r * stride_gr + g + tl.arange(0, 1))
        b = tl.where(picked < 0.0, total + tl.log(tl.maximum(-picked, 1e-38)), float("-inf"))
        lse_att = log_add(a, b)
    else:
        lse_att = tl.load(LseAtt + r * stride_lr + g + tl.arange(0, 1))
    # (out + r · tail) / (1 + r · mass), r = exp(total - lse_att), in the log domain
    # (ref.merge_tail: r overflows where the two lse are far apart)
    biggest = tl.max(tl.abs(tail), axis=0)  # NaN or inf where the tail is not finite
    ok = (mass > 0.0) & (mass + biggest < float("inf"))
    safe = tl.where(ok, mass, 1.0)
    w = tl.where(ok, tl.sigmoid(total - lse_att + tl.log(safe)), 0.0)
    merged = out + w * (tl.where(ok, tail / safe, 0.0) - out)
    tl.store(Res + r * stride_rr + g * stride_rg + d, merged.to(Res.dtype.element_ty))
