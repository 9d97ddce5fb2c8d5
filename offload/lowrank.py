"""LowRankKeys: a per-kv-head PCA sketch of the post-RoPE keys, for cheap scoring on the GPU.

Why PCA of post-RoPE keys (Loki-style) rather than SVD of pre-RoPE keys (ShadowKV): the
sketch scores q·k directly, with no per-position rotation work and no chunk landmarks.
Keys are centred first: q·k = q·mean + q·(k - mean); the first term is exact and the same
for every key, so the sketch spends its rank on the centred part, which PCA captures best.
"""

from __future__ import annotations

import torch


class LowRankKeys:
    """mean [L, Hkv, D], basis [L, Hkv, D, r], projected keys [L, Hkv, N, r] on the device."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 rank: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rank = rank
        self.mean = torch.zeros(num_layers, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.basis = torch.zeros(num_layers, num_kv_heads, head_dim, rank, device=device,
                                 dtype=dtype)
        self.keys = torch.zeros(num_layers, num_kv_heads, max_tokens, rank, device=device,
                                dtype=dtype)

    def build(self, layer: int, k: torch.Tensor, heads: slice = slice(None)) -> None:
        """Fit the given heads' bases on a prompt's keys k [heads, n, D]; project them all."""
        kf = k.to(self.keys.device, torch.float32)
        mean = kf.mean(dim=1, keepdim=True)  # [Hkv, 1, D]
        centred = kf - mean
        cov = centred.transpose(1, 2) @ centred  # [Hkv, D, D]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        basis = vecs[..., -self.rank:]  # [Hkv, D, r]
        self.mean[layer, heads] = mean[:, 0].to(self.mean.dtype)
        self.basis[layer, heads] = basis.to(self.basis.dtype)
        self.keys[layer, heads, :k.shape[1]] = (centred @ basis).to(self.keys.dtype)

    def append(self, layer: int, pos: torch.Tensor, k: torch.Tensor) -> None:
        """k [Hkv, 1, D] of the token at position pos ([1] on the device; no sync)."""
        projected = (k - self.mean[layer, :, None]) @ self.basis[layer]  # [Hkv, 1, r]
        self.keys[layer].index_copy_(1, pos, projected)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def scores(self, layer: int, q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Approximate q·k. q [Hkv, G, D] -> [Hkv, G, hi - lo]."""
        qr = q @ self.basis[layer]  # [Hkv, G, r]
        constant = q @ self.mean[layer, :, :, None]  # [Hkv, G, 1]: q·mean, same for all keys
        return qr @ self.keys[layer, :, lo:hi].transpose(1, 2) + constant

    def scores_at(self, layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Approximate q·k of given positions, float32 (as select_scores scores them).
        q [Hkv, G, D], positions [Hkv, K] -> [Hkv, G, K]."""
        qf = q.float()
        qr = qf @ self.basis[layer].float()  # [Hkv, G, r]
        keys = self.keys[layer].gather(1, positions[..., None].expand(-1, -1, self.rank))
        return qr @ keys.float().transpose(1, 2) + qf @ self.mean[layer, :, :, None].float()

    def shares(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, scale: float,
               other_lse: torch.Tensor | None = None, chunk: int = 0,
               shares_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """What the retriever ranks by, fused: q [Hkv, G, D] -> (shares [Hkv, N - lo]
        shares_dtype (bfloat16 where only their top-k is wanted), lse [Hkv, G] float32).
        shares = group_scores of the scores of positions [lo, N) with positions >= hi
        ([1] device tensor) excluded; lse = each head's log-sum-exp over [lo, hi) of the
        scaled scores, log-added to other_lse. Scores are float32 throughout and
        [Hkv, G, N] is never stored (kernels.select_scores). With chunk > 0 also each
        head's mass per chunk of positions [Hkv, G, ceil(N / chunk)]."""
        from .. import kernels

        # the Triton kernel on a GPU; elsewhere its reference (not the interpreter, which
        # tests may have switched on for the whole process)
        fn = kernels.select_scores if self.keys.is_cuda else kernels.select_scores_ref
        return fn(q, self.basis[layer], self.mean[layer], self.keys[layer], lo, hi, scale,
                  other_lse, chunk, shares_dtype)

    def memory_bytes(self) -> dict[str, int]:
        n = sum(t.numel() * t.element_size() for t in (self.mean, self.basis, self.keys))
        return {"gpu" if self.keys.is_cuda else "host": n}
