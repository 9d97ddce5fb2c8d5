"""window_lse: a decode query's log-sum-exp over the GPU window, what the retriever's shares
are normalised with (sinks and recent tokens are attended anyway).

With torch ops it was a product, a cast, a mask and a four-kernel logsumexp per layer;
here it is one launch. Where it runs: CUDA when q is on a CUDA device; the Triton
interpreter on the CPU when TRITON_INTERPRET=1 (tests); otherwise `window_lse_ref`.
"""

import torch

from retrieval_attn.kernels._launch import interpreting, next_power_of_2, use_triton
from retrieval_attn.kernels.window_lse.ref import window_lse_ref

__all__ = ["window_lse", "window_lse_ref"]

# window slots per tile: one program a row loops over the window (516 slots in the
# presets), on lookahead's chain, where its latency counts. Llama 256K, H100, one engine,
# alternating (ms/token): 256 with 8 warps 8.66 / 8.98 / 8.78 / 8.70, 128 with 4
# 8.68 / 9.04 / 8.89 / 8.84, 128 with 8 8.94 / 8.96 / 8.86 / 8.98, 64 with 4 (before)
# 9.02 / 8.78 / 9.14 / 9.08; 32 with 4 9.20 / 9.22 / 9.17
BLOCK_S = 256
# ... but a tile's keys stay within these bytes (bfloat16 keys of 128 dims: 256 slots):
# float32 keys of 128 dims in 256-slot tiles asked for 264 KiB of shared memory, past a
# Hopper SM's 227 KiB (Qwen2.5-Coder-1.5B in float32)
TILE_BYTES = 256 * 128 * 2
MIN_HEAD_ROWS = 16  # tl.dot needs >= 16 rows: the G heads of a row are padded to this
NUM_WARPS = 8


def window_lse(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
               scale: float, skip: torch.Tensor | None = None) -> torch.Tensor:
    """q [R, G, D] and window keys k [R, S, D] in one dtype on one device, last dims
    contiguous; valid [1] int on that device (slots [0, valid) are filled; no sync) ->
    [R, G] float32 log-sum-exp of the scaled scores (-inf with no filled slot). skip [1]
    int: a slot left out (the newest token's, before it is written there)."""
    rows, g, d = q.shape
    if k.dim() != 3 or k.shape[0] != rows or k.shape[2] != d or k.dtype != q.dtype:
        raise ValueError(f"window keys must be [R={rows}, S, D={d}] {q.dtype}; got "
                         f"{tuple(k.shape)} {k.dtype}")
    for name, t in (("valid", valid), ("skip", valid if skip is None else skip)):
        if t.numel() != 1 or t.device != q.device or k.device != q.device:
            raise ValueError(f"{name} must be a [1] int tensor on q's device, with the keys")
    if (not use_triton(q.device) or d < 16 or d & (d - 1) or q.stride(-1) != 1
            or k.stride(-1) != 1):
        return window_lse_ref(q, k, valid, scale, skip)
    from retrieval_attn.kernels.window_lse.kernel import window_lse_kernel

    out = torch.empty(rows, g, dtype=torch.float32, device=q.device)
    # float32 inputs dot exactly; Triton's interpreter computes bfloat16 dots wrongly
    dot_f32 = q.dtype == torch.float32 or interpreting()
    window_lse_kernel[(rows,)](
        q, k, valid.reshape(1), valid if skip is None else skip.reshape(1), out, g,
        k.shape[1], scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0),
        D=d, G_PAD=max(MIN_HEAD_ROWS, next_power_of_2(g)),
        BLOCK_S=max(16, min(BLOCK_S, TILE_BYTES // (d * k.element_size()))),
        DOT_F32=dot_f32, HAS_SKIP=skip is not None, num_warps=NUM_WARPS)
    return out
