"""guess_query: a looked-ahead layer's queries from an earlier layer's input, one launch.

kv.lookahead_from guesses layer l's queries from layer l - 1's input, on a side stream,
to choose l's re-rank candidates early (offload/lookahead.py). The guess is RMSNorm, the
query projection and RoPE: three launches and a bfloat16 weight read of H·D·C·2 bytes a
layer in PyTorch. Here it is one launch over an int8 copy of the weights (the norm's
weight folded in, a float32 scale per row): half the bytes. The real queries re-rank the
candidates, so the guess's rounding only moves which candidates are read (docs/design.md:
accuracy of the int8 guess).

Where it runs: CUDA when x is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the reference `guess_query_ref`.
"""

from typing import NamedTuple

import torch

from retrieval_attn.kernels._launch import use_triton
from retrieval_attn.kernels.guess_query.ref import guess_query_ref, quantize_guess

__all__ = ["GuessWeights", "guess_query", "guess_query_ref", "quantize_guess"]

ROWS = 4  # dims of each half of a head per program (H100: 8.1 µs a Llama layer; 8: 9.0)
BLOCK_C = 1024  # input features per step of a program
NUM_WARPS = 4


class GuessWeights(NamedTuple):
    """A layer's int8 query projection for guesses (`quantize_guess`)."""

    rows: torch.Tensor  # [H·D, C] int8, the attention norm's weight folded in
    scale: torch.Tensor  # [H·D] float32
    bias: torch.Tensor | None  # [H·D] the projection's bias (Qwen2), or None
    eps: float  # the attention norm's
    heads: int

    @classmethod
    def of(cls, weight: torch.Tensor, norm_weight: torch.Tensor, bias: torch.Tensor | None,
           eps: float, heads: int) -> "GuessWeights":
        """From the query rows of a packed qkv weight [H·D, C] and the norm's weight [C]."""
        rows, scale = quantize_guess(weight, norm_weight)
        return cls(rows, scale, None if bias is None else bias.detach().clone(), eps, heads)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.scale, self.bias)
                   if t is not None)


def guess_query(x: torch.Tensor, w: GuessWeights, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
    """x [B, C] (last dim contiguous); cos, sin [D] of the token's position (x's device,
    contiguous) -> queries [B, H, D] in x's dtype, as `guess_query_ref` (float32
    throughout; the kernel sums in another order and rounds once)."""
    n, c = w.rows.shape
    d = n // w.heads
    if (x.dim() != 2 or x.shape[1] != c or w.rows.dtype != torch.int8
            or w.scale.shape != (n,) or n % w.heads or cos.shape != (d,)
            or sin.shape != (d,) or (w.bias is not None and w.bias.shape != (n,))):
        raise ValueError(f"guess_query: x {tuple(x.shape)}, rows {tuple(w.rows.shape)} "
                         f"{w.rows.dtype}, scale {tuple(w.scale.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)} do not fit [B, C], "
                         f"int8 [H·D, C], [H·D], [D], [D] with H = {w.heads}")
    half = d // 2
    if (not use_triton(x.device) or d % 2 or half % ROWS or x.stride(-1) != 1
            or not (cos.is_contiguous() and sin.is_contiguous())):
        return guess_query_ref(x, w.rows, w.scale, w.bias, cos, sin, w.eps, w.heads)
    from retrieval_attn.kernels.guess_query.kernel import guess_query_kernel

    out = torch.empty(x.shape[0], w.heads, d, dtype=x.dtype, device=x.device)
    if out.numel():
        grid = (x.shape[0], n // (2 * ROWS))
        bias = w.bias if w.bias is not None else w.scale  # unread without HAS_BIAS
        guess_query_kernel[grid](x, w.rows, w.scale, bias, cos, sin, out, c, x.stride(0),
                                 w.eps, HAS_BIAS=w.bias is not None, D=d, ROWS=ROWS,
                                 BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return out
