"""Triton kernel: gather rows of a K and a V store by per-head token indices.

One program copies BLOCK_K selected rows of one kv head, for K and V (same indices). The
sources may be pinned host memory: the GPU then reads them over PCIe without a staging copy
(unified virtual addressing), so many small independent row loads in flight are what keeps
the link busy. The wrapper (`__init__.py`) checks shapes and strides and picks the grid.
"""

import triton
import triton.language as tl


@triton.jit
def gather_kv_kernel(
    KSrc, VSrc, Idx, KOut, VOut,  # [Hkv, N, D], [Hkv, N, D], [Hkv, K], [Hkv, K, D] x2
    K,  # selected tokens per head
    stride_ksh, stride_ksn,
    stride_vsh, stride_vsn,
    stride_ih, stride_ik,
    stride_koh, stride_kok,
    stride_voh, stride_vok,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_V: tl.constexpr,  # False: gather K only (VSrc, VOut unused)
):
    head = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < K
    # int64 offsets: a head of a long host store easily exceeds 2**31 elements.
    tok = tl.load(Idx + head * stride_ih + rows * stride_ik, mask=row_ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        mask = row_ok[:, None]  # constant along a row: keeps 16-byte vector loads
    else:
        mask = row_ok[:, None] & (cols[None, :] < D)

    k = tl.load(KSrc + head * stride_ksh + tok[:, None] * stride_ksn + cols[None, :], mask=mask)
    tl.store(KOut + head * stride_koh + rows[:, None] * stride_kok + cols[None, :], k, mask=mask)
    if HAS_V:
        v = tl.load(VSrc + head * stride_vsh + tok[:, None] * stride_vsn + cols[None, :],
                    mask=mask)
        tl.store(VOut + head * stride_voh + rows[:, None] * stride_vok + cols[None, :], v,
                 mask=mask)
