"""Reference decode attention over two KV sources: plain float32 PyTorch, same signature."""

import torch


def sparse_attention_ref(
    q: torch.Tensor,
    k_a: torch.Tensor,
    v_a: torch.Tensor,
    len_a: torch.Tensor,
    k_b: torch.Tensor,
    v_b: torch.Tensor,
    len_b: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate both sources, mask tokens past each length, one float32 softmax.

    q: [B, H, D]; k_a, v_a: [B, Hkv, Na, D] with len_a [B]; k_b, v_b: [B, Hkv, Nb, D] with
    len_b [B]. Query head h reads kv head h // G (G = H // Hkv).
    Returns out [B, H, D] in q's dtype and lse [B, H] float32 (natural log of the sum of
    exp(scaled scores) over the valid tokens; -inf, with out = 0, where there are none).
    """
    b, h, d = q.shape
    hkv, na, nb = k_a.shape[1], k_a.shape[2], k_b.shape[2]
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    k = torch.cat([k_a, k_b], dim=2).float().repeat_interleave(g, dim=1)  # [B, H, Na+Nb, D]
    v = torch.cat([v_a, v_b], dim=2).float().repeat_interleave(g, dim=1)
    pos_a = torch.arange(na, device=q.device)
    pos_b = torch.arange(nb, device=q.device)
    valid = torch.cat([pos_a[None, :] < len_a[:, None], pos_b[None, :] < len_b[:, None]],
                      dim=1)  # [B, Na+Nb]
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H]
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no token: all zero
    # Garbage past the lengths may be NaN/inf: zero it so that 0 * garbage cannot leak.
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    out = torch.einsum("bhn,bhnd->bhd", p, v)
    return out.to(q.dtype), lse
