"""Reference gather: plain PyTorch, same signature and layout as `gather_kv`."""

import torch

from retrieval_attn.kernels.formats import dequantize_rows


def gather_kv_ref(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    idx: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k_out[h, j] = k_src[h, idx[h, j]], likewise v; a plain copy, so exact in any dtype.

    k_src, v_src: [Hkv, N, D]; idx: [Hkv, K] int32/int64 on the output device.
    scales: for int8 sources, (k_scale, v_scale) [Hkv, N]: rows come out as
    float32(ints) * float32(scale), cast to dtype.
    Returns k_out, v_out: [Hkv, K, D] on idx's device, in dtype (default: the sources')
    (written into `out` when given).
    """
    rows = idx.to(device=k_src.device, dtype=torch.int64)
    gather_index = rows[:, :, None].expand(-1, -1, k_src.shape[-1])
    k = torch.gather(k_src, 1, gather_index).to(idx.device)
    v = torch.gather(v_src, 1, gather_index).to(idx.device)
    if scales is not None:
        k, v = (dequantize_rows(x, s.to(idx.device).gather(1, idx.long()), dtype)
                for x, s in zip((k, v), scales, strict=True))
    if out is None:
        return k, v
    out[0].copy_(k)
    out[1].copy_(v)
    return out






