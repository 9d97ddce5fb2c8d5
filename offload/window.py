"""WindowCache: attention sinks (first S tokens) and the last W tokens, exact, on the GPU."""

from __future__ import annotations

import torch

from retrieval_attn.kernels.formats import window_slot
from retrieval_attn.kernels.window_lse import window_lse, window_lse_ref
from retrieval_attn.offload.policy import AttnStep


class WindowCache:
    """K, V [L, Hkv, S + W, D]: slots [0, S) hold the sinks, [S, S + W) a ring of recent tokens.

    Order inside the buffer does not matter to attention (RoPE is already applied to the
    keys), so a ring avoids shifting memory every step. Decode tokens are written by
    kernels.append_token (its window_slot is `slot` on the device). with_slot: step_bounds
    also gives the slot of the step's token (lookahead leaves it out of its window lse).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, sink_tokens: int,
                 window_tokens: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, with_slot: bool = False) -> None:
        self.S, self.W, self.with_slot = sink_tokens, window_tokens, with_slot
        shape = (num_layers, num_kv_heads, sink_tokens + window_tokens, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._bounds_step: AttnStep | None = None  # the step _bounds were computed for
        self._bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

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

    def step_bounds(self, layer: int, step: AttnStep
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hi, filled slots, the step's token's slot), [1] each on the device: the end of
        the offloaded region [S, hi), the filled slots once this step's token is in, and
        (with_slot, for lookahead; else None) the slot it goes to. They depend on the
        position alone, so layer 0 computes them and later layers of the step reuse them
        (a step object seen first at a later layer computes them there)."""
        if layer == 0 or self._bounds_step is not step:
            pos = step.positions
            newest = window_slot(pos, self.S, self.W) if self.with_slot else None
            self._bounds = (torch.clamp(pos + 1 - self.W, min=self.S), self.valid_slots(pos),
                            newest)
            self._bounds_step = step
        return self._bounds

    def lse(self, layer: int, qg: torch.Tensor, filled: torch.Tensor,
            skip: torch.Tensor | None = None) -> torch.Tensor:
        """Log-sum-exp [R, G] of the scaled scores of qg [R, G, D] over the filled window
        slots (filled [1]), but slot skip [1] when given (the Triton kernel on a GPU; its
        reference elsewhere, not the interpreter)."""
        fn = window_lse if qg.is_cuda else window_lse_ref
        return fn(qg, self.k[layer], filled, self.k.shape[-1] ** -0.5, skip)

    def offloaded_range(self, n: int) -> tuple[int, int]:
        """Positions [lo, hi) not in the window when n tokens have been seen (maybe empty)."""
        return self.S, max(self.S, n - self.W)

    def memory_bytes(self) -> dict[str, int]:
        return {"gpu" if self.k.is_cuda else "host": 2 * self.k.numel() * self.k.element_size()}
