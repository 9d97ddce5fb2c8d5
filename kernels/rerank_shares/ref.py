"""Reference rerank_shares: plain float32 PyTorch, same signature and layout."""

import torch


def rerank_shares_ref(
    q: torch.Tensor,
    keys: torch.Tensor,
    cand: torch.Tensor,
    hi: torch.Tensor,
    total_lse: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact attention shares of re-rank candidates, summed over each kv head's group.

    q [Hkv, G, D]; keys [Hkv, C, D] the candidates' exact keys; cand [Hkv, C] their
    positions; hi [1]: candidates at positions >= hi are not in the region (share 0);
    total_lse [Hkv, G] each head's log-sum-exp over everything it attends (window and the
    region as sketched). shares [Hkv, C] = sum over g of exp(scale · q_g·k_c - total_g),
    computed in float32 and rounded to out_dtype at the end.
    """
    logits = (q.float() @ keys.float().transpose(1, 2)) * scale  # [Hkv, G, C]
    logits = logits - total_lse.float()[..., None]
    shares = torch.exp(logits).sum(dim=1)  # [Hkv, C]
    return shares.masked_fill(cand >= hi.to(cand.device), 0.0).to(out_dtype)
