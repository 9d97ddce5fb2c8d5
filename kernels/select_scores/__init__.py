"""select_scores: a kv head's group shares of the low-rank scores, without [Hkv, G, N].

The retriever ranks positions by sum over the G query heads of each head's softmax share,
where each head's softmax also covers the tokens attended anyway (other_lse: sinks and
window). Done with torch ops this materialises float32 [Hkv, G, N] several times (scores,
scaled, exp, ...), which at 1M tokens costs more than the model's weights. Here two kernels
read the rank-r sketch twice and write only [Hkv, N] shares plus the [Hkv, G] lse.

Where it runs: CUDA when keys are on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the float32 reference `select_scores_ref`.
"""

import torch

from retrieval_attn.kernels._launch import (
    PROGRAMS_PER_SM,
    cdiv,
    interpreting,
    next_power_of_2,
    sm_count,
    use_triton,
)
from retrieval_attn.kernels.formats import ChunkTail, LseState, SketchQuery
from retrieval_attn.kernels.select_scores.ref import block_sums_ref, select_scores_ref
from retrieval_attn.kernels.sketch_query import sketch_query

__all__ = ["KEY_BITS", "block_sums_ref", "kernel_scores", "select_scores", "select_scores_ref"]

# positions per tile: with tiles of heads (TILES a dot), 64 beat 128 by ~10% at 512K and 1M
# (H100, bench --scores); 256 made the one-pass scoring ~30% slower at 1M (H200, before)
BLOCK_N = 64
MIN_HEAD_ROWS = 16  # tl.dot needs >= 16 rows
MIN_HEAD_PAD = 4  # heads are padded to a power of two >= this (at most 4 tiles a dot)
MAX_SPLITS = 256  # chunks per kv head (the merge reads all partials in one tile)
NUM_WARPS = 4
NUM_STAGES = 3  # software pipelining of the key loads in the position loop
# storage bits per sketch value by keys dtype (uint8: packed int4, see ref.py)
KEY_BITS = {torch.float32: 16, torch.float16: 16, torch.bfloat16: 16, torch.int8: 8,
            torch.uint8: 4}


def kernel_scores(rank: int, key_bits: int) -> bool:
    """Whether the kernel scores a sketch of this rank and storage (KEY_BITS values); else
    the wrapper falls back to the reference, which materialises [Hkv, G, N] (the planner
    counts that). A power-of-two rank: tl.dot needs >= 16 columns, an int8 dot >= 32, and
    int4 keys are dotted per half."""
    return rank & (rank - 1) == 0 and rank >= {16: 16, 8: 32, 4: 64}[key_bits]


def select_scores(
    q: torch.Tensor,
    basis: torch.Tensor,
    mean: torch.Tensor,
    keys: torch.Tensor,
    lo: int,
    hi: torch.Tensor,
    scale: float,
    other_lse: torch.Tensor | None = None,
    chunk: int = 0,
    shares_dtype: torch.dtype = torch.float32,
    lse_state: LseState | None = None,
    block: int = 1,
    query: SketchQuery | None = None,
    tail_sums: torch.Tensor | None = None,
    *,
    sm_share: float = 1.0,
) -> tuple:
    """Group shares of the low-rank scores of positions [lo, N) of one layer.

    Args:
        q: [Hkv, G, D] queries, grouped by kv head.
        basis: [Hkv, D, r]; mean: [Hkv, D]; keys: [Hkv, N, r] projected centred keys, last
            dim contiguous (a layer of LowRankKeys). r a power of two >= 16. Quantised
            sketches: int8 [Hkv, N, r], or packed int4 uint8 [Hkv, N, r / 2] (ref.py's
            format), with the per-dim scales folded into basis.
        lo: first position scored (python int, fixed per CUDA graph).
        hi: [1] int tensor on keys' device; positions >= hi get share 0 and no lse mass.
        scale: score scale (D**-0.5).
        other_lse: [Hkv, G] log-sum-exp of the scaled scores of tokens attended anyway, or
            None.
        chunk: 0, or a power of two <= BLOCK_N: also return each head's softmax mass per
            chunk of positions (what a tail estimate needs), from the same pass.
        shares_dtype: float32, or bfloat16 where only a top-k of the shares is taken
            (re-rank candidates): it is rounded once at the store, and torch.topk of 1M
            bfloat16 values per row is ~30% faster than of float32 (H200).
        lse_state: None (exact: two passes over the keys), or the layer's LseState (one
            pass): shares and mass are normalised by the region's log-sum-exp at the
            previous step, log-added to other_lse (required then), and this step's exact
            one is left in the state for the next. A head's lse moves little from one
            token to the next, and only the heads' relative weights depend on it (docs/design.md:
            one-pass scoring). None yet (-inf) normalises by other_lse alone.
        block: 1, or P: return the shares summed per aligned block of P positions
            [lo + j·P, lo + j·P + P) instead (block_sums_ref), what a block selection ranks
            by. Where P divides BLOCK_N and lo, the kernel sums them as it scores and the
            per-position shares are never stored; otherwise they are summed afterwards.
        query: q as scored, from kernels.sketch_query(q, basis, ..., mean, integer keys),
            when the caller has it already (it also scores selected positions); else it is
            made here. Given, q, basis and mean are read for their shapes only.
        tail_sums: None, or [Hkv, M, D] float32 (or bfloat16) V sums per chunk of `chunk` positions
            (M >= ceil(N / chunk); needs chunk > 0): the pass also sums the tail
            estimate's chunk term, sum_c mass_gc · tail_sums_c / chunk (offload/tail.py),
            which it returns instead of mass. Every chunk with mass is taken as full: true
            where a window of at least `chunk` tokens follows hi.
        sm_share: the share of the device's SMs the grid is sized for, in (0, 1]. The
            pass is bound by memory and fills every SM it is given; below 1 leaves room to
            kernels that run beside it on other streams (kv.lookahead_sm_share).

    Returns:
        shares: [Hkv, N - lo] shares_dtype, sum_g exp(scale * score - lse_g); 0 where
            excluded. With block P > 1: [Hkv, (N - lo) // P] shares_dtype block sums
            (summed in float32), -1 for blocks not wholly before hi.
        lse: [Hkv, G] float32, what shares and mass are normalised by: the log-sum-exp over
            [lo, hi) of the scaled scores (lse_state's previous one instead when given),
            log-added to other_lse when given.
        mass (only with chunk > 0): [Hkv, G, ceil(N / chunk)] float32, per head the sum of
            exp(scale * score - lse) over positions [j·chunk, (j+1)·chunk) in [lo, hi);
            with tail_sums, kernels.ChunkTail partial sums of the chunk term instead.
    """
    hkv, g, d = q.shape
    r = basis.shape[-1]
    n = keys.shape[1]
    width = r // 2 if keys.dtype == torch.uint8 else r  # uint8: two int4 dims per byte
    if (basis.shape != (hkv, d, r) or mean.shape != (hkv, d) or keys.shape != (hkv, n, width)
            or (keys.dtype == torch.uint8 and r % 2)):
        raise ValueError(f"need basis [Hkv, D, r], mean [Hkv, D], keys [Hkv, N, r] "
                         f"([Hkv, N, r / 2] packed int4 uint8, r even) for q "
                         f"{tuple(q.shape)}; got {tuple(basis.shape)}, {tuple(mean.shape)}, "
                         f"{tuple(keys.shape)} {keys.dtype}")
    if not 0 <= lo <= n:
        raise ValueError(f"lo={lo} outside [0, N={n}]")
    if chunk and (chunk & (chunk - 1) or chunk > BLOCK_N):
        raise ValueError(f"chunk={chunk}: a power of two <= {BLOCK_N}, or 0")
    if block < 1:
        raise ValueError(f"block={block}: a count of positions >= 1")
    if shares_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"shares_dtype {shares_dtype}: float32 or bfloat16")
    if tail_sums is not None and (not chunk or tail_sums.dim() != 3
                                  or tail_sums.shape[0] != hkv
                                  or tail_sums.shape[1] < cdiv(n, chunk)
                                  or tail_sums.dtype not in (torch.float32, torch.bfloat16)):
        raise ValueError(f"tail_sums must be float32 or bfloat16 [Hkv, M >= ceil(N / chunk), "
                         f"D] with chunk > 0; got {tuple(tail_sums.shape)} {tail_sums.dtype}, "
                         f"chunk={chunk}, N={n}")
    if hi.numel() != 1 or hi.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"hi must be [1] int32/int64; got {tuple(hi.shape)} {hi.dtype}")
    if other_lse is not None and other_lse.shape != (hkv, g):
        raise ValueError(f"other_lse must be [Hkv, G]=[{hkv}, {g}]; got "
                         f"{tuple(other_lse.shape)}")
    if lse_state is not None and (other_lse is None or lse_state.lse.shape != (2, hkv, g)
                                  or lse_state.lse.dtype != torch.float32
                                  or lse_state.hi.shape != (hkv,)
                                  or lse_state.hi.dtype != torch.long):
        raise ValueError(f"lse_state must be LseState.empty({hkv}, {g}, device) and come "
                         f"with other_lse; got lse {tuple(lse_state.lse.shape)} "
                         f"{lse_state.lse.dtype}, hi {tuple(lse_state.hi.shape)} "
                         f"{lse_state.hi.dtype}, other_lse "
                         f"{'None' if other_lse is None else 'given'}")
    device = keys.device
    for name, t in (("q", q), ("basis", basis), ("mean", mean), ("hi", hi)) + (
            (("other_lse", other_lse),) if other_lse is not None else ()) + (
            (("lse_state", lse_state.lse),) if lse_state is not None else ()):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, keys on {device}")
    if keys.dtype not in KEY_BITS:
        raise ValueError(f"keys dtype {keys.dtype}: one of {', '.join(map(str, KEY_BITS))}")
    if not 0.0 < sm_share <= 1.0:
        raise ValueError(f"sm_share is {sm_share}: a share of the SMs in (0, 1]")
    bits = KEY_BITS[keys.dtype]
    d_tail = tail_sums.shape[2] if tail_sums is not None else 0
    if (not use_triton(device) or not kernel_scores(r, bits) or keys.stride(-1) != 1
            or d_tail & (d_tail - 1) or (tail_sums is not None and (
                tail_sums.stride(-1) != 1 or tail_sums.device != device))):
        return select_scores_ref(q, basis, mean, keys, lo, hi, scale, other_lse, chunk,
                                 shares_dtype, lse_state, block, query, tail_sums)
    if lo % block or BLOCK_N % block:  # blocks would straddle the tiles: sum them after
        shares, *rest = select_scores(q, basis, mean, keys, lo, hi, scale, other_lse, chunk,
                                      torch.float32, lse_state, 1, query, tail_sums)
        return (block_sums_ref(shares, lo, hi, block).to(shares_dtype), *rest)
    from retrieval_attn.kernels.select_scores.kernel import (
        lse_partial_kernel,
        lse_state_kernel,
        shares_kernel,
    )

    f32_dot = keys.dtype == torch.float32 or interpreting()
    if query is None:
        query = sketch_query(q, basis, None, mean, not keys.dtype.is_floating_point)
    const = query.const  # [Hkv, G], contiguous
    if keys.dtype.is_floating_point:
        mul = const  # unread: float scores need no step (a stand-in pointer)
        qr_hi = query.qr.to(keys.dtype)  # [Hkv, G, r]
        qr_lo = (query.qr - qr_hi.float()).to(keys.dtype)  # all zero when keys are float32
    else:  # integer keys: an int8 query and its step per kv head
        qr_hi, mul = query.qr, query.step
        # no lo half: a stand-in pointer, on the GPU and in the interpreter alike (so the
        # CPU tests see the arguments the GPU does)
        qr_lo = qr_hi
    nb = (n - lo) // block
    shares = torch.empty(hkv, n - lo if block == 1 else nb, dtype=shares_dtype, device=device)
    lse = torch.empty(hkv, g, dtype=torch.float32, device=device)
    # tiles start at a multiple of BLOCK_N (positions before lo are masked), so that each
    # tile holds whole mass chunks
    origin = lo - lo % BLOCK_N
    # a dot scores `tiles` tiles of BLOCK_N positions against the G heads (kernel.py,
    # _query): MIN_HEAD_ROWS rows hold tiles·g_pad (head, tile) pairs, not G heads padded
    g_pad = max(MIN_HEAD_PAD, next_power_of_2(g))
    tiles = max(1, MIN_HEAD_ROWS // g_pad)
    step = tiles * BLOCK_N  # positions a program scores per step
    steps = max(cdiv(n - origin, step), 1)
    sms = max(1, int(sm_count(device) * sm_share))
    splits = min(steps, MAX_SPLITS, max(1, cdiv(2 * PROGRAMS_PER_SM * sms, hkv)))
    per_split = cdiv(steps, splits) * step
    splits = cdiv(max(n - origin, 1), per_split)
    part_m = torch.empty(hkv, splits, g_pad, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)
    hi = hi.reshape(1)
    common = (qr_hi.stride(0), qr_hi.stride(1), const.stride(0), keys.stride(0), keys.stride(1),
              part_m.stride(0), part_m.stride(1))
    hi_lo = keys.dtype.is_floating_point  # integer keys: one dot (kernel.py, _scores)
    one_pass = lse_state is not None
    if not one_pass:
        lse_partial_kernel[(hkv, splits)](
            qr_hi, qr_lo, const, mul, keys, hi, part_m, part_l, lo, origin, n, *common, scale,
            g, G_PAD=g_pad, R=r, BLOCK_N=BLOCK_N, F32_DOT=f32_dot, CHUNK=per_split,
            HI_LO=hi_lo, KEY_BITS=bits, TILES=tiles, num_warps=NUM_WARPS,
            num_stages=NUM_STAGES)
    # other_lse is unread when None, mass when chunk is 0 (lse stands in for the pointers)
    other = other_lse.float().contiguous() if other_lse is not None else lse
    nm = cdiv(n, chunk) if chunk else 0
    tail = tail_sums is not None
    mass = (torch.zeros(hkv, g, nm, dtype=torch.float32, device=device) if chunk and not tail
            else lse[:, :, None])
    state, state_hi = lse_state if one_pass else (lse, hi)  # unread without one_pass
    # the tail's chunk term per split (unread without tail_sums: stand-ins)
    part_t = (torch.empty(hkv, splits, g_pad, d_tail, dtype=torch.float32, device=device)
              if tail else part_m[..., None])
    part_tm = torch.empty_like(part_m) if tail else part_m
    sums = tail_sums if tail else part_t
    shares_kernel[(hkv, splits)](
        qr_hi, qr_lo, const, mul, keys, hi, part_m, part_l, other, shares, lse, mass, state,
        state_hi, sums, part_t, part_tm, lo, origin, n, splits, nm, nb, *common,
        other.stride(0), shares.stride(0), lse.stride(0), mass.stride(0), mass.stride(1),
        state.stride(0), state.stride(-2), sums.stride(0), sums.stride(1), part_t.stride(0),
        part_t.stride(1), part_t.stride(2), part_tm.stride(0), part_tm.stride(1),
        scale, g, G_PAD=g_pad, R=r, BLOCK_N=BLOCK_N,
        S_PAD=next_power_of_2(splits), HAS_OTHER=other_lse is not None, F32_DOT=f32_dot,
        CHUNK=per_split, MASS_CHUNK=chunk, HI_LO=hi_lo, KEY_BITS=bits, ONE_PASS=one_pass,
        BLOCK=block, TILES=tiles, TAIL=tail, D=max(d_tail, 1), num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    if one_pass:  # after the pass: every program has read the state
        lse_state_kernel[(hkv,)](part_m, part_l, lse, state, state_hi, hi, splits,
                                 part_m.stride(0), part_m.stride(1), lse.stride(0),
                                 state.stride(0), state.stride(1), g, G_PAD=g_pad,
                                 S_PAD=next_power_of_2(splits))
    if tail:
        return shares, lse, ChunkTail(part_t, part_tm)
    return (shares, lse, mass) if chunk else (shares, lse)
