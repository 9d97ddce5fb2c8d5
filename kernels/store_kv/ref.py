"""Reference store: plain PyTorch, same signature and layout as `store_kv`."""

import torch


def store_kv_ref(k_dst: torch.Tensor, v_dst: torch.Tensor, pos: torch.Tensor,
                 k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """k_dst[h, pos[t]] = k_new[h, t], likewise v.

    k_dst, v_dst: [Hkv, N, D]; pos: [T] int; k_new, v_new: [Hkv, T, D].
    """
    rows = pos.to(device=k_dst.device, dtype=torch.int64)
    k_dst.index_copy_(1, rows, k_new.to(k_dst.device, k_dst.dtype))
    v_dst.index_copy_(1, rows, v_new.to(v_dst.device, v_dst.dtype))
