"""Which KV policy a config names, and making one."""

from __future__ import annotations

import torch

from retrieval_attn.config import (
    IndexConfig,
    KVConfig,
    check_for_shape,
    check_sections,
    resolve_for_shape,
)
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.sparse import SparseKV


def policy_class(policy: str) -> type[DenseKV] | type[SparseKV]:
    """The class behind kv.policy: what the planner asks (e.g. layer_major) without
    allocating one."""
    return DenseKV if policy == "dense" else SparseKV


def make_kv_policy(cfg: KVConfig, num_layers: int, num_heads: int, num_kv_heads: int,
                   head_dim: int, max_tokens: int, device: torch.device,
                   dtype: torch.dtype, index: IndexConfig | None = None,
                   progress: bool = False, batch: int = 1) -> DenseKV | SparseKV:
    """The policy cfg names, sized for `batch` sequences decoded together; cfg and index
    checked against each other and the model's shape first (config.py's rules); a
    kv.rank of None becomes half the head_dim (config.resolve_for_shape)."""
    cfg = resolve_for_shape(cfg, head_dim)
    check_sections(cfg, index or IndexConfig(), batch)
    check_for_shape(cfg, num_layers, head_dim, "the model")
    if policy_class(cfg.policy) is DenseKV:
        return DenseKV(num_layers, batch, num_kv_heads, max_tokens, head_dim, device, dtype)
    return SparseKV(cfg, num_layers, num_heads, num_kv_heads, head_dim, max_tokens, device,
                    dtype, index, progress, batch)
