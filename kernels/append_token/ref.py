"""Reference append_token: plain PyTorch, same signature and layout.

One decode token's K, V [R, D] (R = batch · Hkv rows) go to every place a sparse decode
keeps them: the host store, the window ring, the tail estimate's chunk sums of V, and the
low-rank key sketch (projected onto the row's basis; rounded to its integers when the
sketch is quantised, in the storage format of kernels/formats.py).
"""

import torch

from retrieval_attn.kernels.formats import (
    SketchLayer,
    TailLayer,
    quantize_rows,
    sketch_rows,
    window_slot,
)


def add_to_tail(pos: torch.Tensor, v: torch.Tensor, tail: TailLayer) -> None:
    """Add v [R, D] to each row's sum of the chunk holding pos, unless the row's last
    added position was pos already."""
    fresh = (pos != tail.last).float()[:, None, None]  # [R, 1, 1]
    # a bfloat16 sum is added to in float32 and rounded once per token, as the kernel does
    added = tail.sums.float().index_select(1, pos // tail.chunk) + v[:, None].float() * fresh
    tail.sums.index_copy_(1, pos // tail.chunk, added.to(tail.sums.dtype))
    tail.last.copy_(pos.expand_as(tail.last))


def append_token_ref(
    pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor],
    window: tuple[torch.Tensor, torch.Tensor],
    sinks: int,
    tail: TailLayer | None = None,
    sketch: SketchLayer | None = None,
    store_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write the token at position pos ([1] int) with keys and values k, v [R, D].

    store: (K, V) [R, N, D] of one layer of the host store (int8, with its row scales
    store_scale (K, V) [R, N] float16, when quantised); window: (K, V) [R, S + W, D] of
    one layer of the window (sinks = S); tail, sketch: that layer's, or None.
    """
    at = pos.to(store[0].device)
    for rows, x, scales in zip(store, (k, v), store_scale or (None, None), strict=True):
        if scales is not None:
            x, scale = quantize_rows(x)
            scales.index_copy_(1, pos.to(scales.device), scale[:, None].to(scales.device))
        rows.index_copy_(1, at, x[:, None].to(rows.device))
    slot = window_slot(pos, sinks, window[0].shape[1] - sinks)
    window[0].index_copy_(1, slot, k[:, None])
    window[1].index_copy_(1, slot, v[:, None])
    if tail is not None:
        add_to_tail(pos, v, tail)
    if sketch is not None:
        sketch.keys.index_copy_(1, pos, sketch_rows(k, sketch)[:, None])
