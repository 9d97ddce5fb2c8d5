"""rms_norm: RMSNorm of the rows of x in one launch (the model's two norms per layer).

Where it runs: CUDA when x is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the reference `rms_norm_ref`.
"""

import torch

from retrieval_attn.kernels._launch import next_power_of_2, use_triton
from retrieval_attn.kernels.rms_norm.ref import rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]

MAX_ROW = 1 << 15  # elements of a row held by one program


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] (last dim contiguous), weight [C] of x's dtype and device -> [..., C]
    contiguous, x's dtype: x / sqrt(mean(x²) + eps) times weight, in float32, rounded
    once (rms_norm_ref also rounds before the weight, and sums in another order: they
    differ by up to a step or two of the dtype)."""
    c = x.shape[-1]
    if weight.shape != (c,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be [{c}] {x.dtype} on {x.device}; got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if not use_triton(x.device) or c > MAX_ROW or x.stride(-1) != 1:
        return rms_norm_ref(x, weight, eps)
    from retrieval_attn.kernels.rms_norm.kernel import rms_norm_kernel

    rows = x.reshape(-1, c)  # a view unless x's rows are not evenly strided
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = next_power_of_2(c)
        rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0),
                                          c, eps, BLOCK_C=block,
                                          num_warps=8 if block >= 4096 else 4)
    return out.view(x.shape)
