"""tail_correct: add the estimated attention tail to a decode step's exact output, fused.

offload/tail.py explains the estimate. With torch ops the correction was about twenty
kernels per layer (pad, scatter of the selected tokens' mass, clamp, divide, a batched
float32 product, sums, the merge); here it is two launches that read the chunk masses
and the chunk V sums once.

Where it runs: CUDA when sums are on a CUDA device; the Triton interpreter on the CPU
when TRITON_INTERPRET=1 (tests); otherwise the float32 reference `tail_correct_ref`.
"""

from typing import NamedTuple

import torch

from retrieval_attn.kernels._launch import (
    PROGRAMS_PER_SM,
    cdiv,
    next_power_of_2,
    sm_count,
    use_triton,
)
from retrieval_attn.kernels.formats import ChunkTail
from retrieval_attn.kernels.tail_correct.ref import (
    SPLITS,
    chunk_tail_ref,
    guess_lse_ref,
    tail_correct_ref,
)

__all__ = ["TailPartials", "chunk_tail_ref", "guess_lse_ref", "tail_correct",
           "tail_correct_ref", "tail_merge", "tail_partials"]

# chunks, or selected tokens, per step of a program: the selected tokens' partials (on the
# side stream) are half as many as with 64 and the merge, on the critical path, reads half
# as many. Llama 256K final choice, H100, one engine, alternating: 128 with 8 warps
# 9.27 ms/token against 64 with 4 warps 9.46 (4 rounds; 3 more: 9.39 against 9.58); 64 with
# 8 warps 9.43, 128 with 4 9.46, 256 with 8 9.86
BLOCK = 128
MIN_HEAD_ROWS = 16  # tl.dot needs >= 16 rows: the G heads of a row are padded to this
NUM_WARPS = 8
MERGE_WARPS = 4
DOT_PRECISION = "ieee"  # the partial sums' float32 dots
MERGE_TILE = 64  # partials the merge reads per step (32 and 128 were slower: docs/experiments.md)


class TailPartials(NamedTuple):
    """What tail_partials leaves for tail_merge: the chunks' partials, the selected
    tokens' (their mass negated), and total_lse [R, G]."""

    chunks: ChunkTail
    picked: ChunkTail
    total: torch.Tensor


def tail_correct(out: torch.Tensor, lse_att: torch.Tensor, mass: torch.Tensor,
                 total_lse: torch.Tensor, selected: torch.Tensor,
                 selected_scores: torch.Tensor, count: torch.Tensor, pos: torch.Tensor,
                 sums: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """out [R, G, D] with the tail merged in; arguments as in `tail_correct_ref`.

    mass [R, G, Mm] float32, total_lse and lse_att [R, G] float32, selected [R, K] int,
    selected_scores [R, G, K] float32, count and pos [1] int on sums' device, sums
    [R, M, D] float32 or bfloat16 (read as float32) with M >= Mm a multiple of SPLITS.
    """
    _check(out.shape, lse_att.shape, mass, total_lse, selected, selected_scores, sums)
    device = sums.device
    D = sums.shape[-1]
    if (not use_triton(device) or D & (D - 1) or D < 16
            or sums.dtype not in (torch.float32, torch.bfloat16)):
        return tail_correct_ref(out, lse_att, mass, total_lse, selected, selected_scores,
                                count, pos, sums, scale, chunk)
    parts = tail_partials(mass, total_lse, selected, selected_scores, count, pos, sums,
                          scale, chunk)
    return tail_merge(out, lse_att, parts)


def _check(out_shape, lse_shape, mass, total_lse, selected, selected_scores, sums) -> None:
    R, M, D = sums.shape
    G = total_lse.shape[1] if total_lse.dim() == 2 else -1
    K = selected.shape[1]
    if isinstance(mass, ChunkTail):
        S, g_pad = mass.part_t.shape[1:3]
        bad = (mass.part_t.shape != (R, S, g_pad, D) or mass.part_m.shape != (R, S, g_pad)
               or g_pad < G)
    else:
        bad = mass.shape[:2] != (R, G) or mass.shape[2] > M
    if (bad or out_shape != (R, G, D) or lse_shape != (R, G) or total_lse.shape != (R, G)
            or selected_scores.shape != (R, G, K) or selected.shape[0] != R or M % SPLITS):
        mass_shape = (f"chunk partials {tuple(mass.part_t.shape)}, {tuple(mass.part_m.shape)}"
                      if isinstance(mass, ChunkTail) else f"mass {tuple(mass.shape)}")
        raise ValueError(f"tail_correct: out {tuple(out_shape)}, lse_att "
                         f"{tuple(lse_shape)}, {mass_shape}, total_lse "
                         f"{tuple(total_lse.shape)}, selected {tuple(selected.shape)}, "
                         f"selected_scores {tuple(selected_scores.shape)}, sums "
                         f"{tuple(sums.shape)} do not fit [R, G, D], [R, G, Mm] (or "
                         f"[R, S, G_PAD, D], [R, S, G_PAD] partials, G_PAD >= G), [R, K], "
                         f"[R, G, K], [R, M, D] with Mm <= M, M a multiple of {SPLITS}")


def tail_partials(mass: torch.Tensor | ChunkTail, total_lse: torch.Tensor,
                  selected: torch.Tensor, selected_scores: torch.Tensor, count: torch.Tensor,
                  pos: torch.Tensor, sums: torch.Tensor, scale: float, chunk: int
                  ) -> TailPartials:
    """tail_correct's first launch (GPU, or the interpreter): everything that does not
    need the exact attention's output, so a caller may run it beside the value gather.
    mass: the chunk masses [R, G, Mm], or their partial sums already made (ChunkTail,
    select_scores' tail_sums): then only the selected tokens' part is launched."""
    R, G = total_lse.shape
    D = sums.shape[-1]
    K = selected.shape[1]
    _check((R, G, D), (R, G), mass, total_lse, selected, selected_scores, sums)
    device = sums.device
    from retrieval_attn.kernels.tail_correct.kernel import tail_partials_kernel

    scores = selected_scores.float().contiguous()
    total, selected = total_lse.float().contiguous(), selected.contiguous()
    made = isinstance(mass, ChunkTail)
    if made:
        n_splits, per_split, Mm = 0, 1, 0
        mass_arg = total  # unread: no program sums chunks
    else:
        mass_arg = mass.float().contiguous()
        Mm = mass.shape[2]
        # enough programs for the chunk sums to fill the GPU: a 1M-token row has 16K chunks
        want = max(SPLITS, cdiv(PROGRAMS_PER_SM * sm_count(device), R))
        per_split = cdiv(max(Mm, 1), min(want, cdiv(max(Mm, 1), BLOCK)))
        n_splits = cdiv(max(Mm, 1), per_split)
    n_parts = n_splits + cdiv(K, BLOCK)
    g_pad = max(MIN_HEAD_ROWS, next_power_of_2(G))
    part_t = torch.empty(R, n_parts, g_pad, D, dtype=torch.float32, device=device)
    part_m = torch.empty(R, n_parts, g_pad, dtype=torch.float32, device=device)
    if n_parts:
        tail_partials_kernel[(R, n_parts)](
            mass_arg, sums, selected, scores, count.reshape(1), total, pos.reshape(1),
            part_t, part_m, Mm, K, G, scale, n_splits,
            mass_arg.stride(0), mass_arg.stride(1), sums.stride(0),
            sums.stride(1), selected.stride(0), scores.stride(0), scores.stride(1),
            total.stride(0), part_t.stride(0), part_t.stride(1), part_t.stride(2),
            part_m.stride(0), part_m.stride(1),
            D=D, G_PAD=g_pad, CHUNK=chunk, BLOCK=BLOCK, PER_SPLIT=per_split,
            DOT_PRECISION=DOT_PRECISION, num_warps=NUM_WARPS)
    picked = ChunkTail(part_t[:, n_splits:], part_m[:, n_splits:])
    chunks = mass if made else ChunkTail(part_t[:, :n_splits], part_m[:, :n_splits])
    return TailPartials(chunks, picked, total)


def tail_merge(out: torch.Tensor, lse_att: torch.Tensor, parts: TailPartials,
               guess_window_lse: torch.Tensor | None = None) -> torch.Tensor:
    """tail_correct's second launch: out [R, G, D] and lse_att [R, G] of the exact
    attention merged with tail_partials' sums -> [R, G, D] in out's dtype.

    With guess_window_lse [R, G] (lookahead: the sketch was scored with a guess at the
    query), the exact part's weight comes from the guess alone and lse_att is unread:
    guess_lse_ref(guess_window_lse, selected_scores, count, scale), with the selected
    tokens' sketch lse taken from the partials (no launches of its own)."""
    from retrieval_attn.kernels.tail_correct.kernel import tail_merge_kernel

    (ct, cm), (st, sm), total = parts
    R, G, D = out.shape
    lse_att, out = lse_att.float().contiguous(), out.contiguous()
    guess = lse_att if guess_window_lse is None else guess_window_lse.float().contiguous()
    res = torch.empty_like(out)
    tail_merge_kernel[(R, G)](
        out, lse_att, total, ct, cm, st, sm, res, guess, G,
        out.stride(0), out.stride(1), lse_att.stride(0), total.stride(0),
        ct.stride(0), ct.stride(1), ct.stride(2), cm.stride(0), cm.stride(1),
        st.stride(0), st.stride(1), st.stride(2), sm.stride(0), sm.stride(1),
        res.stride(0), res.stride(1), guess.stride(0),
        D=D, N_CHUNK=ct.shape[1], N_SEL=st.shape[1], PARTS_TILE=MERGE_TILE,
        HAS_GUESS=guess_window_lse is not None, num_warps=MERGE_WARPS)
    return res
