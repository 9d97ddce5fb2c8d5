"""QuestRetriever: the Quest baseline (page-level key bounds), a Retriever like the
low-rank one (index/base.py): positions [Hkv, k] and a device-side count."""

from __future__ import annotations

import torch

from retrieval_attn.index.base import Selection


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
        self.page_ids = torch.arange(pages, device=device)

    def build(self, layer: int, k: torch.Tensor, heads: slice = slice(None)) -> None:
        """k [heads, n, D]: the given heads' bounds of every page the prompt touches."""
        Hkv, n, D = k.shape
        full = n // self.P * self.P
        k = k.to(self.kmin.device)
        kmin, kmax = self.kmin[layer, heads], self.kmax[layer, heads]  # views
        kmin.fill_(float("inf"))
        kmax.fill_(float("-inf"))
        if full:
            pages = k[:, :full].reshape(Hkv, full // self.P, self.P, D)
            kmin[:, :full // self.P] = pages.amin(dim=2)
            kmax[:, :full // self.P] = pages.amax(dim=2)
        for pos in range(full, n):  # the partial last page
            page = pos // self.P
            kmin[:, page] = torch.minimum(kmin[:, page], k[:, pos])
            kmax[:, page] = torch.maximum(kmax[:, page], k[:, pos])

    def append(self, layer: int, pos: torch.Tensor, k: torch.Tensor) -> None:
        """k [Hkv, 1, D] of the token at position pos ([1] on the device; no sync)."""
        page = pos // self.P
        self.kmin[layer].index_copy_(1, page, torch.minimum(
            self.kmin[layer].index_select(1, page), k))
        self.kmax[layer].index_copy_(1, page, torch.maximum(
            self.kmax[layer].index_select(1, page), k))

    def select(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, k: int,
               other_lse: torch.Tensor | None = None) -> Selection:
        """q [Hkv, G, D] -> the tokens of the top k // P pages (other_lse unused)."""
        first, pages = -(-lo // self.P), self.kmin.shape[2]  # first page wholly past lo
        n_pages = min(max(pages - first, 0), k // self.P)
        last = hi // self.P  # pages before this one end by hi
        count = (torch.clamp(last - first, 0, n_pages) * self.P).to(torch.int32)
        if n_pages <= 0:
            return Selection(torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device),
                             count)
        kmin, kmax = self.kmin[layer, :, first:], self.kmax[layer, :, first:]  # [Hkv, P', D]
        qe = q[:, :, None, :]  # [Hkv, G, 1, D]
        bound = torch.maximum(qe * kmin[:, None], qe * kmax[:, None]).sum(-1).amax(dim=1)
        bound = bound.masked_fill(self.page_ids[first:] >= last, float("-inf"))
        top = bound.topk(n_pages, dim=-1).indices + first  # [Hkv, pages]
        offsets = torch.arange(self.P, device=q.device)
        return Selection((top[:, :, None] * self.P + offsets).reshape(q.shape[0], -1), count)

    def memory_bytes(self) -> dict[str, int]:
        n = 2 * self.kmin.numel() * self.kmin.element_size()
        return {"gpu" if self.kmin.is_cuda else "host": n}
