"""rerank_shares: the exact attention shares of re-rank candidates, fused.

The low-rank retriever takes top_k × rerank_factor candidates by sketch score, gathers
their exact keys, and keeps the top_k by exact share of each head's attention, summed
over the kv head's group. This is that scoring in one kernel: no [Hkv, G, C] logits in
memory and one launch instead of about nine per layer.

Where it runs: CUDA when keys are on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the float32 reference `rerank_shares_ref`.
"""

import torch

from retrieval_attn.kernels._launch import cdiv, interpreting, next_power_of_2, use_triton
from retrieval_attn.kernels.rerank_shares.ref import rerank_shares_ref

__all__ = ["rerank_shares", "rerank_shares_ref"]

BLOCK_C = 64  # candidates per program
MIN_HEAD_ROWS = 16  # tl.dot needs >= 16 rows: the G heads of a kv head are padded to this
NUM_WARPS = 4


def rerank_shares(
    q: torch.Tensor,
    keys: torch.Tensor,
    cand: torch.Tensor,
    hi: torch.Tensor,
    total_lse: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Group shares of the candidates' exact scores.

    Args:
        q: [Hkv, G, D] queries, grouped by kv head.
        keys: [Hkv, C, D] the candidates' exact keys (q's dtype), last dim contiguous.
        cand: [Hkv, C] int candidate positions.
        hi: [1] int tensor on keys' device; candidates at positions >= hi get share 0.
        total_lse: [Hkv, G] float32 log-sum-exp of each head's scaled scores over all it
            attends (window and the sketched region): shares are shares of that.
        scale: score scale (D**-0.5).
        out_dtype: float32, or bfloat16 when only a top-k of the shares is taken.

    Returns:
        shares: [Hkv, C] out_dtype, sum_g exp(scale · q_g·k_c - total_lse_g).
    """
    hkv, g, d = q.shape
    c = keys.shape[1]
    if keys.shape != (hkv, c, d) or cand.shape != (hkv, c) or total_lse.shape != (hkv, g):
        raise ValueError(f"need keys [Hkv, C, D], cand [Hkv, C], total_lse [Hkv, G] for q "
                         f"{tuple(q.shape)}; got {tuple(keys.shape)}, {tuple(cand.shape)}, "
                         f"{tuple(total_lse.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype {out_dtype}: float32 or bfloat16")
    if hi.numel() != 1:
        raise ValueError(f"hi must be [1]; got {tuple(hi.shape)}")
    device = keys.device
    for name, t in (("q", q), ("cand", cand), ("hi", hi), ("total_lse", total_lse)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, keys on {device}")
    if (not use_triton(device) or d & (d - 1) or d < 16 or keys.stride(-1) != 1
            or q.stride(-1) != 1 or keys.dtype != q.dtype):
        return rerank_shares_ref(q, keys, cand, hi, total_lse, scale, out_dtype)
    from retrieval_attn.kernels.rerank_shares.kernel import rerank_shares_kernel

    out = torch.empty(hkv, c, dtype=out_dtype, device=device)
    if c == 0:
        return out
    total = total_lse.float().contiguous()
    cand = cand.contiguous()
    f32_dot = q.dtype == torch.float32 or interpreting()
    rerank_shares_kernel[(hkv, cdiv(c, BLOCK_C))](
        q, keys, cand, hi.reshape(1), total, out, c, g, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        cand.stride(0), total.stride(0), out.stride(0),
        D=d, G_PAD=max(MIN_HEAD_ROWS, next_power_of_2(g)), BLOCK_C=BLOCK_C, F32_DOT=f32_dot,
        num_warps=NUM_WARPS)
    return out
