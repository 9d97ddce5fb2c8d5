"""Reference window_lse: each query head's log-sum-exp over the filled window slots."""

import torch


def window_lse_ref(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
                   scale: float, skip: torch.Tensor | None = None) -> torch.Tensor:
    """q [R, G, D], window keys k [R, S, D], valid [1] int (slots [0, valid) are filled)
    -> [R, G] float32 log-sum-exp of the scaled scores over the filled slots (but slot
    skip [1], when given)."""
    scores = (q @ k.transpose(1, 2)).float() * scale  # [R, G, S]
    slots = torch.arange(k.shape[1], device=k.device)
    empty = slots >= valid.to(k.device)
    if skip is not None:
        empty |= slots == skip.to(k.device)
    return torch.logsumexp(scores.masked_fill(empty, float("-inf")), dim=-1)
