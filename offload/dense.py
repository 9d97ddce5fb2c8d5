"""DenseKV: the exact reference policy. All past K, V in one preallocated cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval_attn.kernels.sparse_attention import sparse_attention
from retrieval_attn.offload.policy import AttnStep


class DenseKV:
    """Full KV cache [L, B, Hkv, N, D] on the model's device; exact causal attention."""

    graph_safe = True  # fixed shapes: the decode step can be captured in a CUDA graph
    state_version = 0  # the cache is allocated once
    # every layer's cache is on the device anyway: prefill goes chunk by chunk through all
    # layers, holding one chunk's hidden states instead of the whole prompt's
    layer_major = False

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_tokens: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_layers, batch, num_kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = torch.arange(max_tokens, device=device)  # [N]
        self.max_tokens, self.B = max_tokens, batch
        self.seq = 0  # the sequence a one-sequence prefill writes

    def start_request(self, prompt_tokens: int | None = None, seq: int = 0) -> None:
        """Prefill of sequence seq of the batch comes next. Nothing to reset: every slot a
        request reads is written first."""
        if not 0 <= seq < self.B:
            raise ValueError(f"sequence {seq} of a batch of {self.B}")
        self.seq = seq

    def finish_layer(self, layer: int, n: int) -> None:
        """The layer's K, V stay where prefill wrote them."""

    def finish_prefill(self, n: int) -> None:
        """Dense attention keeps the prompt's K, V where prefill wrote them."""

    def memory_bytes(self) -> dict[str, int]:
        nbytes = 2 * self.k.numel() * self.k.element_size()
        return {"gpu" if self.k.is_cuda else "host": nbytes}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttnStep) -> torch.Tensor:
        if step.start is None:
            return self._attend_static(layer, q, k, v, step.positions)
        T = q.shape[2]
        start, end = step.start, step.start + T
        # all sequences at once (a batched decode step), or the one being prefilled
        rows = slice(None) if q.shape[0] == self.B else slice(self.seq, self.seq + 1)
        self.k[layer, rows, :, start:end] = k
        self.v[layer, rows, :, start:end] = v
        keys, values = self.k[layer, rows, :, :end], self.v[layer, rows, :, :end]
        if T == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # a later prefill chunk: query i sees keys 0 .. start + i
            mask, causal = step.positions[:, None] >= self.slots[None, :end], False
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              is_causal=causal, enable_gqa=True)

    def _attend_static(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        # Shapes fixed at N = max_tokens so that the step can be captured in a CUDA graph.
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        if q.is_cuda:  # flash-decoding: split over the cache, as a fair dense baseline must
            return _flash_decode(q, self.k[layer], self.v[layer], positions[-1:] + 1)
        valid = self.slots <= positions[-1]  # [N]
        return dense_decode_attention(q, self.k[layer], self.v[layer], valid)


def _flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  length: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, D] over the first length ([1], on the device) slots of k, v
    [B, Hkv, N, D] -> [B, H, 1, D]: the sparse_attention kernel with no retrieved source,
    split over N so that a 1M-token cache is read at HBM speed (a plain matmul + softmax,
    p @ V with a 1M-long inner dimension, ran ~15x slower at 1M)."""
    B = q.shape[0]
    none = k[:, :, :0]  # [B, Hkv, 0, D]: no second source
    out, _ = sparse_attention(q[:, :, 0], k, v, length.expand(B), none, none,
                                      torch.zeros_like(length).expand(B))
    return out[:, :, None]


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """Exact attention of one new token over the masked cache.

    q [B, H, 1, D]; k, v [B, Hkv, N, D]; valid [N] bool -> out [B, H, 1, D].
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # the G query heads of each kv head, side by side
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * D**-0.5  # [B, Hkv, G, N]
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, D)
