"""What a retriever is and what it answers: the Retriever protocol and its Selection.

A retriever sees positions [lo, hi): the offloaded region, neither sinks nor window. lo is
fixed (the sink count); hi is a device tensor [1], because it grows every step and a CUDA
graph must not bake it in. So a retriever scores the whole capacity [lo, N) with positions
>= hi masked out, and answers with fixed-size outputs plus a device-side count: positions
[R, K] (R = B·Hkv kv-head rows; best first unless the retriever knows nobody reads the
order) and count [1], the number of leading entries that are real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # types only: importing kernels here first would meet their import cycle
    from retrieval_attn.kernels.formats import ChunkTail, SketchQuery


@dataclass(frozen=True)
class Selection:
    """One layer's answer for one decode step. Everything but positions and count is
    what a low-rank retriever saw on the way, for the caller's tail estimate
    (offload/tail.py); the other retrievers leave it None."""

    positions: torch.Tensor  # [R, K] int64 in [lo, N)
    count: torch.Tensor  # [1] int32: leading entries of positions that are real
    # [R, K, D] the chosen tokens' exact keys, where a re-rank read them (the caller then
    # reads only their values); None: read both
    keys: torch.Tensor | None = None
    # [R, G] each query head's log-sum-exp over window + sketched region (the shares'
    # normaliser); None without a window lse or when nothing was scored
    total: torch.Tensor | None = None
    # the sketch's softmax mass per chunk of positions [R, G, ceil(N / chunk)], or on a
    # GPU the tail's chunk term summed in the scoring pass (kernels.ChunkTail); None
    # without a tail chunk or when nothing was scored
    mass: torch.Tensor | ChunkTail | None = None
    query: SketchQuery | None = None  # q as the sketch scored it (LowRankKeys.query)


class KeySketch(Protocol):
    capacity: int

    def scores(self, layer: int, q: torch.Tensor, lo: int, hi: int) -> torch.Tensor: ...


class Retriever(Protocol):
    def select(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, k: int,
               other_lse: torch.Tensor | None = None) -> Selection:
        """q [R, G, D] -> the top-k positions of each row (other_lse [R, G]: the window's
        log-sum-exp, for shares of each head's whole attention)."""
        ...
