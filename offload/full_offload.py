"""FullOffloadKV: the "offload everything" baseline (HF OffloadedCache's approach, done fairly).

All K, V live in pinned host memory; each decode step streams every layer's K, V to the
device and runs exact attention. Layer l + 1's copy runs on a side stream while layer l
computes (two device buffers), which is the best this design can do: its floor is the
PCIe time of the whole cache per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from retrieval_attn.offload.kv_store import KVStore
from retrieval_attn.offload.policy import AttnStep


class FullOffloadKV:
    graph_safe = False
    state_version = 0
    layer_major = True

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, batch: int = 1) -> None:
        self.L, self.device = num_layers, device
        self.B, self.Hkv, rows = batch, num_kv_heads, batch * num_kv_heads  # B·Hkv rows
        self.store = KVStore(num_layers, rows, max_tokens, head_dim, dtype,
                             pin=device.type == "cuda")
        shape = (2, 2, rows, max_tokens, head_dim)  # [buffer, k|v, B·Hkv, N, D]
        self.buffers = torch.empty(shape, device=device, dtype=dtype)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.n = 0

    def start_request(self, prompt_tokens: int | None = None) -> None:
        self.n = 0

    def finish_layer(self, layer: int, n: int) -> None:
        self.n = n

    def finish_prefill(self, n: int) -> None:
        self.n = n

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prompt K, V [B·Hkv, n, D] of one layer straight into the host store."""
        self.store.write(layer, 0, k, v)
        self.n = k.shape[1]

    def _prefetch(self, layer: int, n: int) -> None:
        buf = self.buffers[layer % 2]
        stream = self.copy_stream or torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            # one contiguous block per head: a strided host slice would not go by DMA
            for h in range(buf.shape[1]):
                buf[0, h, :n].copy_(self.store.k[layer, h, :n], non_blocking=True)
                buf[1, h, :n].copy_(self.store.v[layer, h, :n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.ready[layer % 2] = event

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttnStep) -> torch.Tensor:
        if q.shape[2] != 1:
            raise NotImplementedError("FullOffloadKV is a decode baseline: fill() the prompt")
        pos, (B, _, _, D) = step.start, k.shape
        n = pos + 1
        k, v = k.reshape(B * self.Hkv, 1, D), v.reshape(B * self.Hkv, 1, D)  # [B·Hkv, 1, D]
        self.store.write(layer, pos, k, v)
        if layer == 0:
            torch.cuda.current_stream().synchronize()  # the new token's K, V are in the store
            self._prefetch(0, n)
        torch.cuda.current_stream().wait_event(self.ready[layer % 2])
        buf = self.buffers[layer % 2]
        keys = buf[0, :, :n].view(B, self.Hkv, n, D)  # [B, Hkv, n, D]
        values = buf[1, :, :n].view(B, self.Hkv, n, D)
        if layer + 1 < self.L:
            # the next layer's copy may reuse the other buffer once this step is queued
            self.copy_stream.wait_stream(torch.cuda.current_stream())
            self._prefetch(layer + 1, n)
        buf[0, :, pos] = k[:, 0]  # this step's token: its host copy lands after the copy
        buf[1, :, pos] = v[:, 0]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

    def memory_bytes(self) -> dict[str, int]:
        gpu = self.buffers.numel() * self.buffers.element_size()
        return {"gpu": gpu, **self.store.memory_bytes()}
