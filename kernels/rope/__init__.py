"""rope: rotary position embedding of q or k in one launch.

Where it runs: CUDA when x is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the reference `rope_ref`.
"""

import torch

from retrieval_attn.kernels._launch import use_triton
from retrieval_attn.kernels.rope.ref import rope_ref

__all__ = ["rope", "rope_ref"]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] (any strides, last dim contiguous); cos, sin [T, D] of x's dtype
    and device, last dim contiguous -> [B, H, T, D] contiguous: rope_ref computed in
    float32 and rounded once (rope_ref rounds each product too: they differ by up to a
    step of the dtype). D / 2 must be a power of two for the kernel (else the reference
    runs)."""
    b, h, t, d = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (t, d) or table.dtype != x.dtype or table.device != x.device:
            raise ValueError(f"{name} must be [T={t}, D={d}] {x.dtype} on {x.device}; got "
                             f"{tuple(table.shape)} {table.dtype} on {table.device}")
    half = d // 2
    if (not use_triton(x.device) or d % 2 or half & (half - 1) or x.stride(-1) != 1
            or cos.stride(-1) != 1 or sin.stride(-1) != 1):
        return rope_ref(x, cos, sin)
    from retrieval_attn.kernels.rope.kernel import rope_kernel

    out = torch.empty(b, h, t, d, dtype=x.dtype, device=x.device)
    if out.numel():
        rope_kernel[(b * h * t,)](x, cos, sin, out, h, t, x.stride(0), x.stride(1),
                                  x.stride(2), cos.stride(0), sin.stride(0), HALF=half,
                                  num_warps=1)
    return out
