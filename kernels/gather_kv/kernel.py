"""Triton kernel: gather rows of a K and a V store by per-head token indices.

One program copies BLOCK_K selected rows of one kv head, for K and V (same indices). The
sources may be pinned host memory: the GPU then reads them over PCIe without a staging copy
(unified virtual addressing), so many small independent row loads in flight are what keeps
the link busy. int8 sources (a quantised store) come with a scale per row, kept in device
memory so the link carries only the integers. The wrapper (`__init__.py`) checks shapes and
strides and picks the grid.
"""

import triton
import triton.language as tl


@triton.jit
def _dequantize(x, Scale, head, tok, row_ok, stride_h, stride_n, OUT):
    """int8 rows x [BLOCK_K, BLOCK_D] times their scales (device memory) -> OUT's dtype."""
    s = tl.load(Scale + head * stride_h + tok * stride_n, mask=row_ok, other=0.0)
    return (x.to(tl.float32) * s.to(tl.float32)[:, None]).to(OUT.dtype.element_ty)


@triton.jit
def gather_kv_kernel(
    KSrc, VSrc, Idx, KOut, VOut,  # [Hkv, N, D], [Hkv, N, D], [Hkv, K], [Hkv, K, D] x2
    KScale, VScale,  # [Hkv, N] x2 on the device (unread without HAS_SCALE)
    K,  # selected tokens per head
    stride_ksh, stride_ksn,
    stride_vsh, stride_vsn,
    stride_ih, stride_ik,
    stride_koh, stride_kok,
    stride_voh, stride_vok,
    stride_kch, stride_kcn, stride_vch, stride_vcn,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_V: tl.constexpr,  # False: gather K only (VSrc, VOut unused)
    HAS_SCALE: tl.constexpr,  # int8 sources: rows come out times their scales
):
    head = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    # a few programs, each over many tiles: programs waiting on host reads hold their SM
    # slots, and fewer of them leave the SMs to the kernels running beside (wrapper)
    for start in range(tl.program_id(1) * BLOCK_K, K, tl.num_programs(1) * BLOCK_K):
        rows = start + tl.arange(0, BLOCK_K)
        row_ok = rows < K
        # int64 offsets: a head of a long host store easily exceeds 2**31 elements.
        tok = tl.load(Idx + head * stride_ih + rows * stride_ik, mask=row_ok,
                      other=0).to(tl.int64)
        if BLOCK_D == D:
            mask = row_ok[:, None]  # constant along a row: keeps 16-byte vector loads
        else:
            mask = row_ok[:, None] & (cols[None, :] < D)
        k = tl.load(KSrc + head * stride_ksh + tok[:, None] * stride_ksn + cols[None, :],
                    mask=mask)
        if HAS_SCALE:
            k = _dequantize(k, KScale, head, tok, row_ok, stride_kch, stride_kcn, KOut)
        tl.store(KOut + head * stride_koh + rows[:, None] * stride_kok + cols[None, :], k,
                 mask=mask)
        if HAS_V:
            v = tl.load(VSrc + head * stride_vsh + tok[:, None] * stride_vsn + cols[None, :],
                        mask=mask)
            if HAS_SCALE:
                v = _dequantize(v, VScale, head, tok, row_ok, stride_vch, stride_vcn, VOut)
            tl.store(VOut + head * stride_voh + rows[:, None] * stride_vok + cols[None, :], v,
                     mask=mask)
