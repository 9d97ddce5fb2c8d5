"""Block selection: the retriever picks aligned runs of P tokens instead of single tokens.

Why: the GPU reads selected rows of the host store over PCIe, and at long contexts a read
of scattered 256-byte rows is limited by address translation, not by bytes. On the H100,
over a 28-layer 1M-token store, K of 4096 scattered rows per head took 197 µs a layer
(~21 GB/s), the same rows in runs of 4 tokens 97 µs (~43 GB/s, what a narrow span gets);
K of candidates then V of the final set, 429 vs 202 µs with the candidates in runs and
the final set chosen among them position by position (LowRankRetriever). The price is
accuracy: runs are ranked by their summed sketch shares, so a strong position beside weak
neighbours may be left out (docs/results.md).

Blocks are aligned at `lo` (the first offloaded position, past the sinks): block j holds
positions [lo + j·P, lo + j·P + P). Only blocks wholly before `hi` (the start of the
window) are eligible; the up to P - 1 positions of the partial block [lo + nf·P, hi) are
always attended, appended after the chosen blocks, so no position is attended twice and
none of the region is skipped for being near the window.
"""

from __future__ import annotations

import torch

from retrieval_attn.kernels.select_scores import block_sums_ref as block_sums  # noqa: F401 (part of this module's API)


def blocks_for(k: int, block: int) -> int:
    """Blocks holding a budget of k tokens (rounded up)."""
    return -(-k // block)


def slots_for(k: int, block: int) -> int:
    """Positions a block selection of budget k returns: its blocks and the partial one."""
    return k if block == 1 else blocks_for(k, block) * block + block


def block_tokens(blocks: torch.Tensor, start: int, block: int,
                 first: torch.Tensor | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """blocks [R, b] block numbers -> [R, b·P] positions start + j·P + (0..P-1), block by
    block (so position i of the output belongs to block i // P), in one launch. first:
    block 0's positions [P] (start + 0..P-1) where the caller keeps them; out: an int64
    [R, b·P] (a view: the decode writes the chosen runs before the partial one, no cat)."""
    if first is None:
        first = start + torch.arange(block, device=blocks.device)
    rows, b = blocks.shape
    if out is None:
        out = torch.empty(rows, b * block, dtype=torch.long, device=blocks.device)
    torch.add(first, blocks[..., None], alpha=block, out=out.view(rows, b, block))
    return out


def partial_block(lo: int, hi: torch.Tensor, block: int, capacity: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions [lo + nf·P, lo + nf·P + P) of the block hi falls in ([P], clamped to
    the capacity: those at or past hi are never attended) and how many of them are
    before hi ([1])."""
    first = lo + (hi - lo) // block * block  # [1]
    positions = torch.clamp(first + torch.arange(block, device=hi.device), max=capacity - 1)
    return positions, hi - first
