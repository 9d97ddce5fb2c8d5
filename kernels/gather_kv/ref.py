"""Reference gather: plain PyTorch, same signature and layout as `gather_kv`."""

import torch


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


def quantize_rows(x: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (ints [..., D] int8, scale [...] scale_dtype): each row's absmax
    maps to 127 (the scale rounded to scale_dtype first, so that ints * scale is what is
    read back; no smaller than scale_dtype's smallest normal number), rounded half to even.
    float16 scales for the K, V store's rows; float32 for weights (kernels.quantize_guess)."""
    top = x.float().abs().amax(dim=-1)
    scale = (top / 127).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    ints = (x.float() / scale.float()[..., None]).round_().clamp_(-127, 127)
    return ints.to(torch.int8), scale


def dequantize_rows(ints: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
    """ints [..., D] int8, scale [...] -> float32(ints) * float32(scale) in dtype."""
    return (ints.float() * scale.float()[..., None]).to(dtype)


# the smallest float16 row scale: a row of zeros stores zeros (a normal float16, 2**-14)
SCALE_MIN = torch.finfo(torch.float16).tiny
