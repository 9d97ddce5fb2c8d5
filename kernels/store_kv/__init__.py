"""store_kv: write the K, V rows of new tokens into one layer of a KV store.

The destination is typically pinned host memory (the host KV store) and the positions a
device tensor, so appending a decoded token needs no host synchronisation and can be
captured in a CUDA graph. Where it runs: as gather_kv (CUDA; the interpreter on the CPU
with TRITON_INTERPRET=1; otherwise the reference).
"""

import torch

from retrieval_attn.kernels._launch import next_power_of_2, use_triton
from retrieval_attn.kernels.store_kv.ref import store_kv_ref

__all__ = ["store_kv", "store_kv_ref"]


def store_kv(k_dst: torch.Tensor, v_dst: torch.Tensor, pos: torch.Tensor,
             k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """k_dst[h, pos[t]] = k_new[h, t], likewise v.

    Args:
        k_dst, v_dst: [Hkv, N, D], last dim contiguous; pinned host memory or on the
            device of k_new. Positions must lie in [0, N) (not checked: no sync).
        pos: [T] int32/int64 on k_new's device.
        k_new, v_new: [Hkv, T, D] in the destination's dtype, last dim contiguous.
    """
    if k_dst.dim() != 3 or k_dst.shape != v_dst.shape:
        raise ValueError(f"k_dst, v_dst must both be [Hkv, N, D]; got {tuple(k_dst.shape)} "
                         f"and {tuple(v_dst.shape)}")
    hkv, _, d = k_dst.shape
    t = pos.shape[0]
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != (hkv, t, d) or x.dtype != k_dst.dtype or x.stride(-1) != 1:
            raise ValueError(f"{name} must be [{hkv}, {t}, {d}] {k_dst.dtype} with a "
                             f"contiguous last dim; got {tuple(x.shape)} {x.dtype}")
    device = k_new.device
    if pos.device != device or pos.dim() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError("pos must be a [T] int32/int64 tensor on k_new's device")
    dst_ok = k_dst.device == device or (device.type == "cuda" and k_dst.is_pinned()
                                        and v_dst.is_pinned())
    if not dst_ok or k_dst.stride(-1) != 1 or v_dst.stride(-1) != 1:
        raise ValueError(f"destination on {k_dst.device} cannot be written from {device}: "
                         "host destinations must be pinned, with a contiguous last dim")
    if t == 0:
        return
    if not use_triton(device):
        store_kv_ref(k_dst, v_dst, pos, k_new, v_new)
        return

    from retrieval_attn.kernels.store_kv.kernel import store_kv_kernel

    store_kv_kernel[(hkv, t)](
        k_dst, v_dst, pos, k_new, v_new,
        *k_dst.stride()[:2], *v_dst.stride()[:2], *k_new.stride()[:2], *v_new.stride()[:2],
        D=d, BLOCK_D=next_power_of_2(d), num_warps=1,
    )
