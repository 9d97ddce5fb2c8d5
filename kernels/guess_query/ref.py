"""Reference guessed queries: plain PyTorch, same signature and layout as `guess_query`."""

import torch

from retrieval_attn.kernels.formats import quantize_rows
from retrieval_attn.kernels.rope.ref import rope_ref

PIECE = 512  # rows quantised at a time


def quantize_guess(weight: torch.Tensor, norm_weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's query rows of the packed qkv weight [N, C] (N = H·D) and its attention
    norm's weight [C] -> (int8 [N, C], float32 scales [N]): the norm's weight folded into
    the columns, then each row rounded to int8 by its largest magnitude (quantize_rows with
    float32 scales). In pieces of PIECE rows, so the float32 temporaries stay small beside
    the model."""
    rows = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for i in range(0, weight.shape[0], PIECE):
        folded = weight[i:i + PIECE].float() * norm_weight.float()
        rows[i:i + PIECE], scale[i:i + PIECE] = quantize_rows(folded, torch.float32)
    return rows, scale


def guess_query_ref(x: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                    eps: float, heads: int) -> torch.Tensor:
    """x [B, C] (a layer's input, before its norm); rows [N, C] int8 and scale [N] from
    `quantize_guess`; bias [N] or None; cos, sin [D] of the token's position -> queries
    [B, H, D] in x's dtype: RMSNorm, the query projection and RoPE, in float32."""
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [B, 1]
    q = (xf @ rows.float().t()) * scale * inv_rms  # [B, N]
    if bias is not None:
        q = q + bias.float()
    q = q.view(x.shape[0], heads, -1)  # [B, H, D]
    return rope_ref(q, cos.float(), sin.float()).to(x.dtype)
