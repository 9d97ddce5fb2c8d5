"""Reference tail_correct: plain float32 PyTorch, same signature and layout."""

import torch

from retrieval_attn.kernels.formats import ChunkTail

SPLITS = 64  # the chunk axis is summed as SPLITS batched products: as one [G, M] @ [M, D]
# product per kv head (M = 16K chunks at 1M) cuBLAS picked a kernel without split-K that
# took 0.5 ms per layer on an H100




def chunk_tail_ref(mass: torch.Tensor, sums: torch.Tensor, chunk: int) -> ChunkTail:
    """The chunk term of mass [R, G, Mm] against V chunk sums [R, M >= Mm, D], as one
    partial (S 1, G_PAD G), every chunk taken as full (filled = chunk): what select_scores
    makes with tail_sums, where the window (>= chunk tokens) follows every chunk with mass."""
    part_t = (mass.float() / chunk) @ sums[:, :mass.shape[2]].float()  # [R, G, D]
    return ChunkTail(part_t[:, None], mass.float().sum(-1)[:, None])


def tail_correct_ref(out: torch.Tensor, lse_att: torch.Tensor, mass: torch.Tensor,
                     total_lse: torch.Tensor, selected: torch.Tensor,
                     selected_scores: torch.Tensor, count: torch.Tensor, pos: torch.Tensor,
                     sums: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """Merge the estimated tail into the exact part of a decode step (offload/tail.py).

    out [R, G, D], lse_att [R, G]: attention over window ∪ selected, and its log-sum-exp.
    mass [R, G, Mm]: per head, the sketch's softmax mass exp(score · scale - total_lse) in
    each chunk of `chunk` positions (Mm <= M chunks). total_lse [R, G]: the log-sum-exp
    the mass is relative to. selected [R, K] positions attended exactly, selected_scores
    [R, G, K] their sketch scores, count [1] how many of the K are real. pos [1]: the
    current position (a chunk's V sum covers min(chunk, pos + 1 - start) tokens). sums
    [R, M, D] float32 or bfloat16: V summed per chunk, M a multiple of SPLITS. Returns [R, G, D] in
    out's dtype: (out + r · tail) / (1 + r · tail mass), r = exp(total_lse - lse_att).
    """
    R, G = mass.shape[:2]
    M = sums.shape[1]
    mass = torch.nn.functional.pad(mass.float(), (0, M - mass.shape[2]))  # [R, G, M]
    # the selected tokens are attended exactly: take their sketch mass out of the tail
    real = torch.arange(selected.shape[1], device=mass.device) < count  # [K]
    p_sel = torch.exp((selected_scores.float() * scale - total_lse[..., None])
                      .masked_fill(~real, -torch.inf))
    chunks = (selected // chunk)[:, None].expand(-1, G, -1)  # [R, G, K]
    mass = mass.scatter_add(2, chunks, -p_sel).clamp_min_(0.0)
    start = torch.arange(M, device=mass.device) * chunk
    filled = torch.clamp(pos + 1 - start, 0, chunk).clamp_min_(1)  # [M]
    weights = (mass / filled).view(R, G, SPLITS, -1).transpose(1, 2)  # [R, S, G, M/S]
    parts = sums.float().view(R, SPLITS, -1, sums.shape[-1])  # [R, S, M/S, D]
    tail = (weights @ parts).sum(dim=1)  # [R, G, D]: sum_m mass_m · sums_m / filled_m
    return merge_tail(out, lse_att, total_lse, tail, mass.sum(dim=-1))


def merge_tail(out: torch.Tensor, lse_att: torch.Tensor, total_lse: torch.Tensor,
               tail: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """out [R, G, D] (lse_att [R, G]) merged with the tail's sum tail [R, G, D] of mass
    [R, G], both relative to total_lse [R, G]: out + w · (tail / mass - out), the tail's
    share w = sigmoid(total_lse - lse_att + log mass), in out's dtype.

    That is (out + r · tail) / (1 + r · mass) with r = exp(total_lse - lse_att), in the
    log domain: the two lse may differ by more than float32's exp reaches (Qwen2's heads
    score keys in the hundreds, and a one-pass lse is the previous step's), where r
    overflowed to inf and inf · 0 mass gave NaN. A tail of no mass, or of mass that is
    not finite (the sketch scored past float32's range), adds nothing."""
    tail, mass = tail.float(), mass.float()[..., None]
    ok = (mass > 0) & torch.isfinite(mass) & torch.isfinite(tail).all(-1, keepdim=True)
    safe = torch.where(ok, mass, 1.0)
    w = torch.where(ok, torch.sigmoid((total_lse - lse_att).float()[..., None] + safe.log()),
                    0.0)
    mean = torch.where(ok, tail / safe, 0.0)
    return (out.float() + w * (mean - out.float())).to(out.dtype)


def guess_lse_ref(guess_window_lse: torch.Tensor, selected_scores: torch.Tensor,
                  count: torch.Tensor, scale: float) -> torch.Tensor:
    """The exact part's log-sum-exp as a guess at the query sees it (lookahead):
    guess_window_lse [R, G] log-added to the lse of the first count selected tokens'
    scaled sketch scores selected_scores [R, G, K] -> [R, G] float32. It stands in for
    lse_att where the sketch was scored with the guess, whose level the real query's
    scores do not share."""
    real = torch.arange(selected_scores.shape[-1], device=selected_scores.device) < count
    picked = torch.logsumexp((selected_scores.float() * scale).masked_fill(~real, -torch.inf),
                             dim=-1)
    return torch.logaddexp(guess_window_lse.float(), picked)
