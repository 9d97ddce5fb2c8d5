"""Triton kernel: write new K, V rows at device-side positions of a (host) KV store.

The mirror of gather_kv: the destination may be pinned host memory, written zero-copy over
PCIe, so a decode step can append its token to the host store from inside a CUDA graph
(the position lives on the device; no host round trip).
"""

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    KDst, VDst, Pos, KNew, VNew,  # [Hkv, N, D] x2, [T], [Hkv, T, D] x2
    stride_kdh, stride_kdn,
    stride_vdh, stride_vdn,
    stride_knh, stride_knt,
    stride_vnh, stride_vnt,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    row = tl.load(Pos + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    k = tl.load(KNew + head * stride_knh + t * stride_knt + cols, mask=mask)
    v = tl.load(VNew + head * stride_vnh + t * stride_vnt + cols, mask=mask)
    tl.store(KDst + head * stride_kdh + row * stride_kdn + cols, k, mask=mask)
    tl.store(VDst + head * stride_vdh + row * stride_vdn + cols, v, mask=mask)
