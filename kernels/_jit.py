"""Triton helpers shared by several kernels (imported only by kernel modules)."""

import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """torch.round's rounding (ties to even), in plain float ops the interpreter runs."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)
