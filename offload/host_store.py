"""HostKVStore: full K (post-RoPE, as attended) and V of every token, in host memory."""

from __future__ import annotations

import torch


class HostKVStore:
    """K, V [L, Hkv, N, D] in host memory, pinned when a GPU will read it.

    Pinned memory lets the gather kernel read selected rows straight from the GPU
    (zero-copy over PCIe) instead of staging a CPU-side gather.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, pin: bool) -> None:
        shape = (num_layers, num_kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.max_tokens = max_tokens

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, T, D] (any device) -> slots [start, start + T) of the layer."""
        end = start + k.shape[1]
        if end > self.max_tokens:
            raise IndexError(f"host KV store holds {self.max_tokens} tokens; write ends at {end}")
        self.k[layer, :, start:end].copy_(k, non_blocking=True)
        self.v[layer, :, start:end].copy_(v, non_blocking=True)

    def memory_bytes(self) -> dict[str, int]:
        return {"host": 2 * self.k.numel() * self.k.element_size()}
