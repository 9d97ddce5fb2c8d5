"""Triton kernel: exact top-k of one row per program, by radix select on the float bits.

The row (C <= BLOCK_C values) stays in registers. Its floats become unsigned integers of
the same order; the k-th largest is found bit by bit from the top (32 counting passes over
registers, fewer for 16-bit inputs), then the values above it and the first of the values
equal to it are written by a prefix sum, so the indices come out in increasing order, and
deterministically. With HAS_VALUES, the program also writes the values of another row
at those columns, and then the ALWAYS columns after C (kept whatever their score), so a
caller gets its chosen positions without a gather and a cat of its own.
"""

import triton
import triton.language as tl


@triton.jit
def _radix_take(x, valid, k, LOW_BITS: tl.constexpr):
    """Which of x (float32, one row in registers) are its k largest among valid, and each
    one's slot in column order: (take, slot). Ties at the cut keep the lower columns."""
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
    return take, slot


@triton.jit
def select_topk_kernel(X, Out, Values, ValOut, C, k, stride_xr, stride_or, stride_vr,
                       stride_wr, BLOCK_C: tl.constexpr, LOW_BITS: tl.constexpr,
                       HAS_VALUES: tl.constexpr, ALWAYS: tl.constexpr,
                       ALWAYS_PAD: tl.constexpr):
    """LOW_BITS: float32 bits that are the same in every value of the input dtype (16 for
    bfloat16, 13 for float16): dropped, so the search takes 32 - LOW_BITS passes.
    HAS_VALUES: ValOut[r, j] = Values[r, Out[r, j]], for the k chosen columns and the
    ALWAYS columns C.. C + ALWAYS - 1 after them (Out holds k + ALWAYS indices then)."""
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_C)
    valid = i < C
    x = tl.load(X + r * stride_xr + i, mask=valid, other=0.0).to(tl.float32)
    take, slot = _radix_take(x, valid, k, LOW_BITS)
    tl.store(Out + r * stride_or + slot, i.to(tl.int64), mask=take)
    if HAS_VALUES:
        v = tl.load(Values + r * stride_vr + i, mask=take)
        tl.store(ValOut + r * stride_wr + slot, v, mask=take)
        if ALWAYS > 0:
            j = tl.arange(0, ALWAYS_PAD)
            keep = j < ALWAYS
            tl.store(Out + r * stride_or + k + j, (C + j).to(tl.int64), mask=keep)
            v = tl.load(Values + r * stride_vr + C + j, mask=keep)
            tl.store(ValOut + r * stride_wr + k + j, v, mask=keep)


@triton.jit
def select_topk_chunks_kernel(X, Values, XOut, VOut, C, k, stride_xr, stride_vr,
                              stride_or, stride_oc, CHUNK: tl.constexpr,
                              LOW_BITS: tl.constexpr, HAS_VALUES: tl.constexpr):
    """One stage of a top-k over rows longer than a program holds: program (r, j) takes
    the top k of x[r, j·CHUNK : (j + 1)·CHUNK] (the same radix select) and writes their x
    and values (Values[r, col], or col itself without HAS_VALUES) to XOut[r, j, :k],
    VOut[r, j, :k], in column order. A chunk with fewer than k columns pads with x = -inf
    and its first column's value: below every real x that is not -inf itself."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    first = j * CHUNK
    i = tl.arange(0, CHUNK)
    valid = first + i < C
    n = tl.minimum(C - first, CHUNK)
    kk = tl.minimum(k, n)
    raw = tl.load(X + r * stride_xr + first + i, mask=valid, other=0.0)
    take, slot = _radix_take(raw.to(tl.float32), valid, kk, LOW_BITS)
    if HAS_VALUES:
        v = tl.load(Values + r * stride_vr + first + i, mask=take)
    else:
        v = first + i
    out = r * stride_or + j * stride_oc
    tl.store(XOut + out + slot, raw, mask=take)
    tl.store(VOut + out + slot, v.to(VOut.dtype.element_ty), mask=take)
    pad = (i >= kk) & (i < k)  # a short last chunk
    tl.store(XOut + out + i, tl.full((CHUNK,), float("-inf"), tl.float32).to(
        XOut.dtype.element_ty), mask=pad)
    if HAS_VALUES:
        v0 = tl.load(Values + r * stride_vr + first)
    else:
        v0 = first
    tl.store(VOut + out + i, tl.zeros((CHUNK,), tl.int64) + v0, mask=pad)
