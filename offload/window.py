"""WindowCache: attention sinks (first S tokens) and the last W tokens, exact, on the GPU."""

from __future__ import annotations

import torch


class WindowCache:
    """K, V [L, Hkv, S + W, D]: slots [0, S) hold the sinks, [S, S + W) a ring of recent tokens.

    Order inside the buffer does not matter to attention (RoPE is already applied to the
    keys), so a ring avoids shifting memory every step. Decode tokens are written by
    kernels.append_token (its window_slot is `slot` on the device).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, sink_tokens: int,
                 window_tokens: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.S, self.W = sink_tokens, window_tokens
        shape = (num_layers, num_kv_heads, sink_tokens + window_tokens, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def slot(self, pos: int) -> int:
        return pos if pos < self.S else self.S + (pos - self.S) % self.W

    def load(self, layer: int, k: torch.Tensor, v: torch.Tensor,
             heads: slice = slice(None)) -> None:
        """Fill the given heads from a whole prompt: k, v [heads, n, D]."""
        n = k.shape[1]
        keep = [p for p in range(min(n, self.S))] + list(range(max(self.S, n - self.W), n))
        pos = torch.tensor(keep, dtype=torch.long, device=k.device)
        slots = torch.tensor([self.slot(p) for p in keep], dtype=torch.long, device=self.k.device)
        self.k[layer, heads, slots] = k[:, pos].to(self.k.device)
        self.v[layer, heads, slots] = v[:, pos].to(self.v.device)

    def valid_slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Filled slots once the token at pos is in: [1] int32 on the device."""
        return torch.clamp(pos + 1, max=self.S + self.W).to(torch.int32)

    def offloaded_range(self, n: int) -> tuple[int, int]:
        """Positions [lo, hi) not in the window when n tokens have been seen (maybe empty)."""
        return self.S, max(self.S, n - self.W)

    def memory_bytes(self) -> dict[str, int]:
        return {"gpu" if self.k.is_cuda else "host": 2 * self.k.numel() * self.k.element_size()}
