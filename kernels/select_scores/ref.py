"""Reference select_scores: plain float32 PyTorch, same signature and layout.

Sketch storage and the one-pass state are in kernels/formats.py.
"""

import torch

from retrieval_attn.kernels.formats import LseState, sketch_values


def select_scores_ref(
    q: torch.Tensor,
    basis: torch.Tensor,
    mean: torch.Tensor,
    keys: torch.Tensor,
    lo: int,
    hi: torch.Tensor,
    scale: float,
    other_lse: torch.Tensor | None = None,
    chunk: int = 0,
    shares_dtype: torch.dtype = torch.float32,
    lse_state: LseState | None = None,
    block: int = 1,
    query=None,
    tail_sums: torch.Tensor | None = None,
) -> tuple:
    """Group shares of the sketched scores of positions [lo, N), and the log-sum-exp used.

    q [Hkv, G, D]; basis [Hkv, D, r]; mean [Hkv, D]; keys [Hkv, N, r] (centred keys projected
    on the basis; int8, or uint8 [Hkv, N, r / 2] packed int4, see above); hi [1]:
    positions >= hi are excluded; other_lse [Hkv, G] or None.
    Score of position n for head (h, g): s = q·mean + (q @ basis)·keys[n], scaled by
    `scale`. lse [Hkv, G] = log-sum-exp of the scaled scores over [lo, hi), log-added to
    other_lse when given. shares [Hkv, N - lo] = sum over g of exp(scaled score - lse);
    0 at excluded positions. With chunk > 0, also mass [Hkv, G, ceil(N / chunk)]: per head,
    the sum of exp(scaled score - lse) over the positions of each chunk of `chunk` positions
    (positions [j·chunk, (j+1)·chunk), excluded ones counting 0). shares are computed in
    float32 and rounded to shares_dtype at the end. Integer keys are scored against
    quantize_query's int8 q @ basis, as the kernel scores them. With lse_state (one pass,
    see select_scores and LseState) the state's lse stands in for the region's, and the
    exact one is left in the state. With block P > 1 the first output is
    block_sums_ref of the float32 shares instead, rounded to shares_dtype. query: a
    kernels.SketchQuery of q, used instead of computing it here. tail_sums [Hkv, M, D]
    (V chunk sums, with chunk > 0): the third output is the chunk term of the tail
    estimate instead of mass (tail_correct.chunk_tail_ref of it).
    """
    if query is None:  # integer keys are scored against an int8 query
        from retrieval_attn.kernels.sketch_query.ref import (
            sketch_query_ref,  # (it imports this module)
        )

        query = sketch_query_ref(q, basis, None, mean, not keys.dtype.is_floating_point)
    qr, const = query.values(), query.const[..., None]  # [Hkv, G, r], [Hkv, G, 1]
    logits = (qr @ sketch_values(keys[:, lo:]).transpose(1, 2) + const) * scale  # [Hkv, G, N - lo]
    positions = torch.arange(lo, keys.shape[1], device=keys.device)
    logits = logits.masked_fill(positions >= hi.to(keys.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    if lse_state is not None:
        hi_now = hi.reshape(1).to(lse_state.hi.device, torch.long)
        fresh = (lse_state.hi != hi_now)[:, None]  # [Hkv, 1]
        used = torch.where(fresh, lse_state.lse[1], lse_state.lse[0])
        lse_state.lse[0].copy_(used)
        lse_state.lse[1].copy_(lse)
        lse_state.hi.copy_(hi_now.expand_as(lse_state.hi))
        lse = used
    if other_lse is not None:
        lse = torch.logaddexp(lse, other_lse.float().to(lse.device))
    norm = lse.masked_fill(lse == float("-inf"), float("inf"))  # no mass anywhere: 0
    probs = torch.exp(logits - norm[..., None]).nan_to_num_(0.0)  # [Hkv, G, N - lo]
    shares = probs.sum(dim=1)
    shares = (shares if block == 1 else block_sums_ref(shares, lo, hi, block)).to(shares_dtype)
    if not chunk:
        return shares, lse
    n = keys.shape[1]
    m = -(-n // chunk)
    padded = torch.nn.functional.pad(probs, (lo, m * chunk - n))  # positions [0, m·chunk)
    mass = padded.view(*probs.shape[:2], m, chunk).sum(dim=-1)
    if tail_sums is not None:
        from retrieval_attn.kernels.tail_correct.ref import chunk_tail_ref

        return shares, lse, chunk_tail_ref(mass, tail_sums, chunk)
    return shares, lse, mass


def block_sums_ref(shares: torch.Tensor, lo: int, hi: torch.Tensor, block: int) -> torch.Tensor:
    """shares [R, N - lo] (per position from lo, any float dtype) -> [R, (N - lo) // P]
    float32 sums per aligned block [lo + j·P, lo + j·P + P); blocks not wholly before hi
    ([1] on the device) get -1."""
    rows, m = shares.shape
    nblk = m // block
    sums = shares[:, :nblk * block].view(rows, nblk, block).float().sum(-1)
    full = (hi.reshape(1).to(shares.device) - lo) // block  # [1]: blocks wholly in [lo, hi)
    ids = torch.arange(nblk, device=shares.device)
    return sums.masked_fill(ids >= full, -1.0)
