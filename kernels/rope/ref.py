"""Reference rotary embedding: plain PyTorch, same signature and layout as `rope`."""

import torch


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, sin [T, D] (x's dtype) -> x·cos + rotate_half(x)·sin, each
    product and the sum rounded to x's dtype (PyTorch's elementwise arithmetic; the model's
    arithmetic on the CPU)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
