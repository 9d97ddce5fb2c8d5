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


@triton.jit
def int4_nibbles(k, PLAIN: tl.constexpr):
    """Packed int4 bytes k (kernels/formats.py: a byte holds dims j and j + R/2,
    each stored as v + 8) -> their (low, high) nibbles as int8 in [0, 15]. PLAIN: per-byte
    ops (the interpreter runs no inline PTX); else inline PTX masks and shifts four bytes
    an instruction (per byte, unpacking cost more than the int8 dots after it, H100)."""
    if PLAIN:
        low = (k & 15).to(tl.int8)
        high = (k >> 4).to(tl.int8)
    else:
        low = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [k],
                                        dtype=tl.int8, is_pure=True, pack=4)
        high = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", "=r,r", [k],
            dtype=tl.int8, is_pure=True, pack=4)
    return low, high
