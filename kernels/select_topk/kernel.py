"""Triton kernel: exact top-k of one row per program, by radix select on the float bits.

The row (C <= BLOCK_C values) stays in registers. Its floats become unsigned integers of
the same order; the k-th largest is found bit by bit from the top (32 counting passes over
registers, fewer for 16-bit inputs), then the values above it and the first of the values
equal to it are written by a prefix sum, so the indices come out in increasing order, and
deterministically.
"""

import triton
import triton.language as tl


@triton.jit
def select_topk_kernel(X, Out, C, k, stride_xr, stride_or, BLOCK_C: tl.constexpr,
                       LOW_BITS: tl.constexpr):
    """LOW_BITS: float32 bits that are the same in every value of the input dtype (16 for
    bfloat16, 13 for float16): dropped, so the search takes 32 - LOW_BITS passes."""
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_C)
    valid = i < C
    x = tl.load(X + r * stride_xr + i, mask=valid, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 is 0.0 (as torch compares), not a smaller key
    bits = x.to(tl.int32, bitcast=True)
    # order-preserving map to uint32: negatives reversed below the non-negatives
    key = tl.where(bits >= 0, bits ^ -2147483648, ~bits).to(tl.uint32, bitcast=True)
    key = tl.where(valid, key >> LOW_BITS, 0)
    thresh = tl.zeros((), dtype=tl.uint32)
    for b in range(31 - LOW_BITS, -1, -1):
        trial = thresh | (tl.full((), 1, tl.uint32) << b)
        if tl.sum((key >= trial).to(tl.int32), axis=0) >= k:
            thresh = trial
    above = valid & (key > thresh)
    equal = valid & (key == thresh)
    need = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(Out + r * stride_or + slot, i.to(tl.int64), mask=take)


# Rows too long for registers (16-bit floats only): the same radix select over programs of
# SLICE positions each, in four launches. Keys are the 16-bit floats' order-preserving bits,
# searched as two 8-bit digits through shared histograms [R, 256]; then each program counts
# its values above and at the cut, and writes its chosen indices after those of the
# programs before it, so the output is still increasing and deterministic. Histogram rows
# are 512 long: keys a program must not count go to bin 256.


@triton.jit
def _keys16(X, r, s, NX, stride_xr, SLICE: tl.constexpr):
    """(16-bit order-preserving keys [SLICE] of slice s of row r, as int32; valid mask,
    positions)."""
    i = s * SLICE + tl.arange(0, SLICE)
    valid = i < NX
    x = tl.load(X + r * stride_xr + i, mask=valid, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 is 0.0
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits ^ -2147483648, ~bits).to(tl.uint32, bitcast=True)
    return (key >> 16).to(tl.int32), valid, i


@triton.jit
def _digit(H, r, want):
    """The digit d of histogram row H[r, :256] (ascending digits; rows are 512 long, the
    upper half counts excluded keys) holding the want-th largest key, and how many keys
    lie in digits above d."""
    b = tl.arange(0, 256)
    h = tl.load(H + r * 512 + b)
    at_least = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # keys in digits >= b
    d = tl.max(tl.where(at_least >= want, b, -1), axis=0)
    return d, tl.sum(tl.where(b > d, h, 0), axis=0)


@triton.jit
def _cut(H1, H2, r, k):
    """(the k-th largest key of row r, keys above it, ties at it to take)."""
    d1, above1 = _digit(H1, r, k)
    d2, above2 = _digit(H2, r, k - above1)
    above = above1 + above2
    return d1 * 256 + d2, above, k - above


@triton.jit
def topk_hist_kernel(X, H1, H2, NX, k, stride_xr, SLICE: tl.constexpr, LEVEL: tl.constexpr):
    """LEVEL 1: histogram of the keys' high digits into H1; LEVEL 2: of the low digits of
    the keys whose high digit holds the cut, into H2."""
    r = tl.program_id(0).to(tl.int64)
    key, valid, _ = _keys16(X, r, tl.program_id(1), NX, stride_xr, SLICE)
    if LEVEL == 1:
        digit = tl.where(valid, key >> 8, 256)  # 256: excluded (the rows' upper half)
        tl.atomic_add(H1 + r * 512 + tl.arange(0, 512), tl.histogram(digit, 512))
    else:
        d1, _ = _digit(H1, r, k)
        digit = tl.where(valid & ((key >> 8) == d1), key & 255, 256)
        tl.atomic_add(H2 + r * 512 + tl.arange(0, 512), tl.histogram(digit, 512))


@triton.jit
def topk_count_kernel(X, H1, H2, Counts, NX, k, stride_xr, stride_cr,
                      SLICE: tl.constexpr):
    """Counts[r, s] = (keys above the cut, keys at it) in slice s."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    key, valid, _ = _keys16(X, r, s, NX, stride_xr, SLICE)
    cut, _, _ = _cut(H1, H2, r, k)
    tl.store(Counts + r * stride_cr + 2 * s, tl.sum((valid & (key > cut)).to(tl.int32), 0))
    tl.store(Counts + r * stride_cr + 2 * s + 1,
             tl.sum((valid & (key == cut)).to(tl.int32), 0))


@triton.jit
def topk_write_kernel(X, H1, H2, Counts, Out, NX, k, n_slices, stride_xr, stride_cr,
                      stride_or, SLICE: tl.constexpr, S_PAD: tl.constexpr):
    """Slice s writes its chosen positions after those of slices < s: the keys above the
    cut, and the first of the ties at it (in position order) while the row needs ties."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    key, valid, i = _keys16(X, r, s, NX, stride_xr, SLICE)
    cut, _, need = _cut(H1, H2, r, k)
    t = tl.arange(0, S_PAD)
    earlier = t < s
    gt = tl.load(Counts + r * stride_cr + 2 * t, mask=earlier, other=0)
    eq = tl.load(Counts + r * stride_cr + 2 * t + 1, mask=earlier, other=0)
    eq_before = tl.cumsum(eq, axis=0) - eq  # ties in the slices before t
    taken = gt + tl.minimum(tl.maximum(need - eq_before, 0), eq)
    base, ties_before = tl.sum(taken, axis=0), tl.sum(eq, axis=0)
    above = valid & (key > cut)
    at = valid & (key == cut)
    take = above | (at & (ties_before + tl.cumsum(at.to(tl.int32), axis=0) <= need))
    slot = base + tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(Out + r * stride_or + slot, i.to(tl.int64), mask=take)
