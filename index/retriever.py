"""Retrievers: given a decode query, pick the top-k past tokens of each kv head.

A retriever sees only positions [lo, hi) (the offloaded region: not sinks, not window)
and returns absolute positions [Hkv, k]. Selection per kv head covers all G query heads
of its GQA group: each head's scores become a softmax distribution and the group's
distributions are summed, so every head's favourite tokens count equally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class KeySketch(Protocol):
    def scores(self, layer: int, q: torch.Tensor, lo: int, hi: int) -> torch.Tensor: ...


class Retriever(Protocol):
    def select(self, layer: int, q: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
        """q [Hkv, G, D] -> positions [Hkv, min(k, hi - lo)] in [lo, hi), int64."""
        ...


def group_scores(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """scores [Hkv, G, M] (q·k estimates) -> [Hkv, M] summed attention probabilities."""
    return torch.softmax(scores.float() * scale, dim=-1).sum(dim=1)


class LowRankRetriever:
    """Top-k by low-rank scores on the GPU, optionally re-ranked with exact keys.

    With rerank_factor m > 1, the top k·m candidates by sketch score are re-scored with
    their exact keys (gathered from the host store) and the best k kept: the sketch only
    has to get the true top-k into a candidate list m times larger.
    """

    def __init__(self, sketch: KeySketch, head_dim: int, rerank_factor: int = 1,
                 exact_keys: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        if rerank_factor > 1 and exact_keys is None:
            raise ValueError("re-ranking needs exact_keys(layer, positions) -> keys")
        self.sketch, self.scale = sketch, head_dim**-0.5
        self.rerank_factor, self.exact_keys = rerank_factor, exact_keys

    def select(self, layer: int, q: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
        m = hi - lo
        if m <= 0 or k <= 0:
            return torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        approx = group_scores(self.sketch.scores(layer, q, lo, hi), self.scale)  # [Hkv, M]
        n_cand = min(m, k * self.rerank_factor)
        cand = approx.topk(n_cand, dim=-1).indices + lo  # [Hkv, C] absolute positions
        if n_cand <= k or self.rerank_factor == 1:
            return cand[:, :k]
        keys = self.exact_keys(layer, cand)  # [Hkv, C, D]
        exact = group_scores(q @ keys.transpose(1, 2).to(q.dtype), self.scale)  # [Hkv, C]
        best = exact.topk(k, dim=-1).indices
        return cand.gather(1, best)


class QuestRetriever:
    """Quest baseline: per-page min/max key bounds, the top pages' tokens are attended.

    page bounds: kmin, kmax [L, Hkv, pages, D]. A page's score for a query head is the
    upper bound sum_d max(q_d·min_d, q_d·max_d); a kv head takes the max over its group.
    Only pages wholly inside [lo, hi) are eligible, so no token is attended twice.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 page_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        pages = -(-max_tokens // page_tokens)
        self.P = page_tokens
        shape = (num_layers, num_kv_heads, pages, head_dim)
        self.kmin = torch.full(shape, float("inf"), device=device, dtype=dtype)
        self.kmax = torch.full(shape, float("-inf"), device=device, dtype=dtype)

    def build(self, layer: int, k: torch.Tensor) -> None:
        """k [Hkv, n, D]: bounds of every page the prompt touches."""
        Hkv, n, D = k.shape
        full = n // self.P * self.P
        k = k.to(self.kmin.device)
        if full:
            pages = k[:, :full].reshape(Hkv, full // self.P, self.P, D)
            self.kmin[layer, :, :full // self.P] = pages.amin(dim=2)
            self.kmax[layer, :, :full // self.P] = pages.amax(dim=2)
        for pos in range(full, n):
            self.append(layer, pos, k[:, pos:pos + 1])

    def append(self, layer: int, pos: int, k: torch.Tensor) -> None:
        p = pos // self.P
        self.kmin[layer, :, p] = torch.minimum(self.kmin[layer, :, p], k[:, 0])
        self.kmax[layer, :, p] = torch.maximum(self.kmax[layer, :, p], k[:, 0])

    def select(self, layer: int, q: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
        first, last = -(-lo // self.P), hi // self.P  # pages wholly inside [lo, hi)
        n_pages = min(max(last - first, 0), k // self.P)
        if n_pages <= 0:
            return torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        kmin = self.kmin[layer, :, first:last]  # [Hkv, pages, D]
        kmax = self.kmax[layer, :, first:last]
        qe = q[:, :, None, :]  # [Hkv, G, 1, D]
        bound = torch.maximum(qe * kmin[:, None], qe * kmax[:, None]).sum(-1)  # [Hkv, G, pages]
        top = bound.amax(dim=1).topk(n_pages, dim=-1).indices + first  # [Hkv, pages]
        offsets = torch.arange(self.P, device=q.device)
        return (top[:, :, None] * self.P + offsets).reshape(q.shape[0], -1)

    def memory_bytes(self) -> dict[str, int]:
        n = 2 * self.kmin.numel() * self.kmin.element_size()
        return {"gpu" if self.kmin.is_cuda else "host": n}
