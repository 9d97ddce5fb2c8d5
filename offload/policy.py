"""The one narrow interface between the model and the KV state.

The model computes q, k, v (post-RoPE) for each layer and hands them to a KVPolicy; the
policy stores k, v and returns the attention output. Swapping dense attention for
retrieval attention is swapping the policy object; the model code never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttnStep:
    """Where the tokens of one forward call sit in the sequence."""

    positions: torch.Tensor  # [T] int64 absolute positions, on the model's device
    # positions[0] as a Python int in eager mode; None inside a CUDA graph, where the
    # position lives only on the device and the policy must not branch on it.
    start: int | None


class KVPolicy(Protocol):
    graph_safe: bool  # decode step has static shapes (may be captured in a CUDA graph)
    state_version: int  # changes whenever the decode state is reallocated (graphs go stale)
    # True: prefill runs layer by layer (finish_layer hands each layer's K, V over as it
    # is done, so no more than one layer's full K, V need exist on the device); False:
    # chunk by chunk through every layer, so only one chunk's hidden states exist.
    layer_major: bool

    def start_request(self, prompt_tokens: int | None = None) -> None:
        """Prepare for a new prompt (prefill comes next)."""
        ...

    def finish_layer(self, layer: int, n: int) -> None:
        """Prefill of this layer is done for all n prompt tokens (layer-major prefill)."""
        ...

    def finish_prefill(self, n: int) -> None:
        """The prompt's n tokens are in; decode steps come next."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttnStep) -> torch.Tensor:
        """Store k, v and attend. q [B, H, T, D]; k, v [B, Hkv, T, D] -> out [B, H, T, D]."""
        ...

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, by place: {"gpu": ..., "host": ...}."""
        ...

    # Optional, for a policy that selects tokens (SparseKV, kv.lookahead_from):
    #   lookahead(layer, guess, step) -> None
    # In a decode step, as layer - 1 starts, the model hands over guess() -> q
    # [B, H, 1, D]: layer's queries computed from layer - 1's input. The policy may start
    # choosing layer's tokens with it, beside layer - 1's own work.
