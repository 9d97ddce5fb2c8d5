"""Triton helpers shared by several kernels (imported only by kernel modules)."""

import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """torch.round's rounding (ties to even), in plain float ops the interpreter runs."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def log_add(a, b):
    """log(exp(a) + exp(b)), -inf when both are."""
    top = tl.maximum(a, b)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    return top_safe + tl.log(tl.exp(a - top_safe) + tl.exp(b - top_safe))
