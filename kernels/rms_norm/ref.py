"""Reference RMSNorm: plain PyTorch, same signature and layout as `rms_norm`."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] -> [..., C]: x / sqrt(mean(x²) + eps) in float32, cast to x's dtype, times
    weight [C] (as the Llama reference implementations round it)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
