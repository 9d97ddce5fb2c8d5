"""LowRankRetriever: given a decode query, pick the top-k past tokens of each kv head.

The contract (positions [lo, hi), a device-side hi and count) is index/base.py's.
Selection per kv head covers all G query heads of its GQA group: each head's scores
become a softmax distribution and the group's distributions are summed, so every head's
favourite tokens count equally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from retrieval_attn.index.base import KeySketch, Selection
from retrieval_attn.index.blocks import (
    block_sums,
    block_tokens,
    blocks_for,
    partial_block,
    slots_for,
)
from retrieval_attn.kernels.formats import ChunkTail, LseState, SketchQuery
from retrieval_attn.kernels.gather_kv import gather_k
from retrieval_attn.kernels.rerank_shares import rerank_shares, rerank_shares_ref
from retrieval_attn.kernels.select_topk import select_topk, select_topk_values, topk_indices


def group_scores(scores: torch.Tensor, scale: float,
                 other_lse: torch.Tensor | None = None) -> torch.Tensor:
    """scores [Hkv, G, M] (q·k estimates, -inf = excluded) -> [Hkv, M] summed probabilities.

    other_lse [Hkv, G]: log-sum-exp of the scaled scores of tokens attended anyway (sinks +
    window). With it, each head's probabilities are shares of its whole attention, so a
    head that looks mostly at the window does not get to pick as many tokens as a head
    that looks far back.
    """
    logits = scores.float() * scale
    lse = torch.logsumexp(logits, dim=-1)  # [Hkv, G]
    if other_lse is not None:
        lse = torch.logaddexp(lse, other_lse.float())
    return torch.exp(logits - lse[..., None]).nan_to_num_(0.0).sum(dim=1)


@dataclass(frozen=True)
class Candidates:
    """Re-rank candidates read from the host (LowRankRetriever.candidates), and what the
    sketch's scoring saw on the way (as in Selection)."""

    positions: torch.Tensor  # [R, C + P]: the C ranked, then P always kept (a partial run)
    keys: torch.Tensor  # [R, C + P, D] their exact keys
    count: torch.Tensor  # [1] leading entries of the answer that are real
    total: torch.Tensor | None  # [R, G] the log-sum-exp their shares are normalised by
    ranked: int  # C
    keep: int  # how many of the C the answer keeps (before the P)
    # [1] candidates at or past it are not ranked: hi, or with runs the partial run's first
    # position (the partial run is kept anyway: a candidate run of ties may be that run)
    end: torch.Tensor
    mass: torch.Tensor | ChunkTail | None = None  # Selection.mass
    query: SketchQuery | None = None  # Selection.query


def _mask_from(hi: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return positions >= hi  # True where a position is not (yet) in the offloaded region


class LowRankRetriever:
    """Top-k by low-rank scores on the GPU, optionally re-ranked with exact keys.

    With rerank_factor m > 1, the top k·m candidates by sketch score are re-scored with
    their exact keys (exact_keys(layer, positions [R, C]) -> [R, C, D], read from the
    store) and the best k kept: the sketch only has to get the true top-k into a
    candidate list m times larger.

    With block P > 1 the host rows it reads come in aligned runs of P positions
    (index/blocks.py): re-rank candidates are the runs of largest summed sketch shares,
    and the final k (rounded up to whole runs) are still chosen one by one by exact shares;
    without re-ranking the chosen runs are attended whole. The partial run before the
    window is always attended, so `select` returns slots_for(k, P) positions. With
    rerank_blocks the final k are the candidate runs of largest summed exact shares, whole
    (their values are then read in runs too).

    With reuse_lse (the default) and a window lse, a fused sketch scores in one pass: each
    head's shares are normalised by the previous step's log-sum-exp over the region (the
    same layer's; none at a prompt's first step) log-added to this step's window lse,
    instead of this step's exact one, which would take a second pass over the sketch
    (kernels.select_scores, lse_state; docs/design.md: one-pass scoring).

    The other settings:
    - region_end: positions at or past it never enter the offloaded region (the window
      holds a prompt's newest tokens): their blocks are never chosen, so the top-k skips
      them (fewer top-k stages where the capacity spills just past a chunk). None: the
      sketch's capacity.
    - chosen_keys: whether a re-rank's Selection carries its chosen tokens' keys (taken
      from the candidates'). A caller whose store is in device memory passes False and
      gathers their K with their V in one launch, on the decode's critical path.
    - tail_chunk > 0: each scoring pass also sums the sketch's softmax mass per chunk of
      tail_chunk positions (Selection.mass). With tail_sums too (V chunk sums
      [L, R, M, D], offload/tail.py), the mass is instead the tail estimate's chunk term
      summed in that pass (kernels.ChunkTail).
    """

    def __init__(self, sketch: KeySketch, head_dim: int, rerank_factor: int = 1,
                 exact_keys: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 block: int = 1, reuse_lse: bool = True, rerank_blocks: bool = False,
                 region_end: int | None = None, chosen_keys: bool = True,
                 tail_chunk: int = 0, tail_sums: torch.Tensor | None = None) -> None:
        if rerank_factor > 1 and exact_keys is None:
            raise ValueError("re-ranking needs exact_keys(layer, positions) -> keys")
        self.sketch, self.scale = sketch, head_dim**-0.5
        self.rerank_factor, self.exact_keys = rerank_factor, exact_keys
        self.block = block
        self.rerank_blocks = rerank_blocks
        self.reuse_lse = reuse_lse
        self.region_end, self.chosen_keys = region_end, chosen_keys
        self.tail_chunk, self.tail_sums = tail_chunk, tail_sums
        self.lse_state: dict[int, LseState] = {}  # per layer
        # blocks are picked only while the region holds the budget's whole blocks (see
        # prepare); a shorter region is attended whole, position by position
        self.use_blocks = False
        # positions come back best first, unless prepare knows that every step fills all
        # k slots (count == k): then nobody reads their order and the top-k skips sorting
        self.ordered = True
        self.positions: torch.Tensor | None = None  # [N] arange on the sketch's device
        # (hi, (lo, blocks), partial block positions, count, its first) of the last hi seen
        self._partial: tuple | None = None
        self._runs: dict[tuple, torch.Tensor] = {}  # _run: (start, p, device) -> positions

    def prepare(self, region: int, k: int) -> None:
        """A prompt's first decode step will see `region` offloaded positions (the count
        only grows from there) and a budget of k: settle what every step of it does, so
        one CUDA graph serves them all."""
        self.use_blocks = self.block > 1 and region >= blocks_for(k, self.block) * self.block
        # a new prompt: no previous step. The states are made afresh by its first step
        # (a prompt's CUDA graph is captured anew), in whatever inference mode that step
        # runs: resetting tensors made under inference_mode outside it would fail
        self.lse_state.clear()
        # when the region holds every slot at the first step, each step fills all of them
        # and their order is never read
        self.ordered = region < slots_for(k, self.block)

    def select(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, k: int,
               other_lse: torch.Tensor | None = None) -> Selection:
        """q [R, G, D] -> Selection: positions [R, K], count [1], and the chosen tokens'
        exact keys [R, K, D] (the dtype exact_keys returns) when re-ranking fetched them
        (and chosen_keys), else None: the caller then needs only their values."""
        found = self.candidates(layer, q, lo, hi, k, other_lse)
        return self.rerank(q, hi, found) if isinstance(found, Candidates) else found

    def candidates(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, k: int,
                   other_lse: torch.Tensor | None = None, sm_share: float = 1.0
                   ) -> Candidates | Selection:
        """The first half of select: the sketch's re-rank candidates and their exact keys,
        chosen with q, for `rerank` to finish; q may be a guess at the query
        (kv.lookahead_from), since the re-rank takes the real one. Where this step does
        not re-rank, select's answer instead. sm_share: the share of the GPU's SMs the
        scoring pass takes (kv.lookahead_sm_share)."""
        if self.use_blocks:
            return self._block_candidates(layer, q, lo, hi, k, other_lse, sm_share)
        k = slots_for(k, self.block)  # a region shorter than the blocks: attend it all
        n = self.sketch.capacity
        if self.positions is None:
            self.positions = torch.arange(n, device=q.device)
        k = min(k, n - lo)
        count = torch.clamp(hi - lo, 0, k).to(torch.int32)
        if k <= 0:  # nothing scored this step
            return Selection(torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device),
                             count)
        n_cand = min(n - lo, k * self.rerank_factor)
        rerank = n_cand > k and self.rerank_factor > 1
        shares, total, mass, query = self._shares(layer, q, lo, hi, other_lse, rerank, 1,
                                                  sm_share)
        # Candidates for re-ranking need no order (an unsorted top-k is ~2.5x faster at 1M);
        # without re-ranking they are the answer, best first unless nobody needs the order.
        cand = shares.topk(n_cand, dim=-1, sorted=not rerank and self.ordered).indices + lo
        if not rerank:
            return Selection(cand[:, :k], count, None, total, mass, query)
        return Candidates(cand, self.exact_keys(layer, cand), count, total, n_cand, k, hi,
                          mass, query)

    def _block_candidates(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor,
                          k: int, other_lse: torch.Tensor | None, sm_share: float = 1.0
                          ) -> Candidates | Selection:
        """candidates in aligned runs of P positions: the best blocks(k)·m runs by summed
        sketch shares, whose keys are read (fast: runs), then the partial block before hi
        (always kept); without re-ranking, the best blocks(k) runs themselves and the
        partial block. count [1] is the chosen positions plus the partial block's before
        hi."""
        P, rows, n = self.block, q.shape[0], self.sketch.capacity
        nb = blocks_for(k, P)
        live = (min(n, self.region_end or n) - lo) // P  # blocks that may be before hi
        n_cand = min(live, nb * self.rerank_factor)
        rerank = n_cand > nb and self.rerank_factor > 1
        sums, total, mass, query = self._shares(layer, q, lo, hi, other_lse, rerank, P,
                                                sm_share)
        top = _top_blocks(sums[:, :live], n_cand if rerank else nb)  # [R, blocks], no order
        part, count, first = self._partial_block(lo, hi, nb)
        C = top.shape[1] * P
        every = torch.empty(rows, C + P, dtype=torch.long, device=top.device)  # [R, C + P]
        block_tokens(top, lo, P, self._run(lo, P, top.device), out=every[:, :C])
        every[:, C:] = part  # the partial block after the chosen runs
        if not rerank:
            return Selection(every, count, None, total, mass, query)
        return Candidates(every, self.exact_keys(layer, every), count, total, C, nb * P,
                          first, mass, query)

    def rerank(self, q: torch.Tensor, hi: torch.Tensor, c: Candidates) -> Selection:
        """The second half of select: the best of the candidates by their exact shares
        under q [R, G, D] (one by one; with rerank_blocks, the runs of largest summed exact
        shares, whole), and any positions always kept -> Selection (positions [R, K],
        count [1], their keys [R, K, D] or None where chosen_keys is False; the
        candidates' total, mass and query)."""
        C, rows = c.ranked, q.shape[0]
        exact = self._exact_shares(q, c.keys[:, :C].to(q.dtype), c.positions[:, :C], c.end,
                                   c.total)
        if not self.use_blocks:
            best = exact.topk(c.keep, dim=-1, sorted=self.ordered).indices  # [R, k]
            return self._chosen(c, c.positions.gather(1, best), best)
        P = self.block
        if self.rerank_blocks:  # the runs of largest exact mass, whole
            runs = _top_columns(exact.float().view(rows, -1, P).sum(-1), c.keep // P)
            best = block_tokens(runs, 0, P)  # [R, keep] into the candidates
            # the chosen candidates, then the partial block (the last P rows, keys too)
            take = torch.cat([best, self._run(C, P, best.device).expand(rows, P)],
                             dim=1)
            return self._chosen(c, c.positions.gather(1, take), take)
        # the chosen candidates and the partial block after them (the last P rows), with
        # their positions: one launch on a GPU
        take, positions = _top_columns_with(exact, c.keep, c.positions, P)
        return self._chosen(c, positions, take)

    def _chosen(self, c: Candidates, positions: torch.Tensor, take: torch.Tensor
                ) -> Selection:
        """The answer of a re-rank: positions [R, K] (the candidates' at take [R, K]), the
        candidates' keys at take [R, K, D] (or None: chosen_keys), what the sketch saw."""
        keys = _take_rows(c.keys, take) if self.chosen_keys else None
        return Selection(positions, c.count, keys, c.total, c.mass, c.query)

    def _run(self, start: int, p: int, device: torch.device) -> torch.Tensor:
        """[P] = start .. start + P - 1, made once per start, size and device (block_tokens'
        first run; the partial block's rows after the candidates): no launch a step."""
        key = (start, p, device)
        if key not in self._runs:
            self._runs[key] = torch.arange(start, start + p, device=device)
        return self._runs[key]

    def _partial_block(self, lo: int, hi: torch.Tensor, nb: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the partial block's positions [P], count [1] int32: the nb chosen blocks'
        positions plus the partial block's before hi, and its first position [1]). They
        depend on hi alone, which a decode step shares across its layers (a new tensor
        each step, never changed in place), so they are computed once per hi tensor."""
        key = (lo, nb)
        if self._partial is None or self._partial[0] is not hi or self._partial[1] != key:
            part, part_count = partial_block(lo, hi, self.block, self.sketch.capacity)
            # every chosen position is before hi
            self._partial = (hi, key, part, (nb * self.block + part_count).to(torch.int32),
                             hi - part_count)
        return self._partial[2:]

    def _exact_shares(self, q: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor,
                      hi: torch.Tensor, total: torch.Tensor | None) -> torch.Tensor:
        """[Hkv, C] group shares of the candidates cand [Hkv, C] by their exact keys
        [Hkv, C, D] (q's dtype), candidates at or past hi excluded: of each head's whole
        attention (window + the region as sketched) when total [Hkv, G] is given."""
        if total is None:
            exact = (q @ keys.transpose(1, 2)).masked_fill(_mask_from(hi, cand)[:, None],
                                                           float("-inf"))
            return group_scores(exact, self.scale)
        return self._rerank_shares(q, keys, cand, hi, total)

    def _rerank_shares(self, q: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor,
                       hi: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """[Hkv, C] exact shares of the candidates (kernels.rerank_shares on a GPU, in
        bfloat16 there: only their top-k is taken; the float32 reference elsewhere)."""
        if q.is_cuda:
            return rerank_shares(q, keys, cand, hi.reshape(1), total, self.scale,
                                         torch.bfloat16)
        return rerank_shares_ref(q, keys, cand, hi.reshape(1), total, self.scale)

    def _shares(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor,
                other_lse: torch.Tensor | None, candidates: bool = False, block: int = 1,
                sm_share: float = 1.0) -> tuple:
        """(group shares [R, N - lo], or their sums per block of `block` positions
        [R, (N - lo) // block] (blocks.block_sums); total lse [R, G] or None without
        other_lse; the chunk mass (Selection.mass) or None; the sketch's query or None).
        Sketches with a fused `shares` (LowRankKeys) never store [R, G, N] scores, and
        on a GPU round them to bfloat16 when they only pick re-rank candidates (a faster
        top-k there; on the CPU it would only change results). sm_share: the share of the
        GPU's SMs a fused sketch's pass takes (others take every SM)."""
        n = self.sketch.capacity
        if hasattr(self.sketch, "shares"):
            dtype = torch.bfloat16 if candidates and q.is_cuda else torch.float32
            state = (self._lse_state(layer, q) if self.reuse_lse and other_lse is not None
                     else None)
            query = self.sketch.query(layer, q)
            sums = (self.tail_sums[layer] if self.tail_sums is not None and self.tail_chunk
                    else None)
            shares, lse, *mass = self.sketch.shares(layer, q, lo, hi, self.scale, other_lse,
                                                    self.tail_chunk, dtype, state, block,
                                                    query, sums, sm_share)
            return (shares, (lse if other_lse is not None else None),
                    mass[0] if mass else None, query)
        excluded = _mask_from(hi, self.positions[lo:])  # [N - lo]
        approx = self.sketch.scores(layer, q, lo, n).masked_fill(excluded, float("-inf"))
        total = None
        if other_lse is not None:
            total = torch.logaddexp(other_lse.float(),
                                    torch.logsumexp(approx.float() * self.scale, dim=-1))
        shares = group_scores(approx, self.scale, other_lse)
        return (shares if block == 1 else block_sums(shares, lo, hi, block)), total, None, None

    def _lse_state(self, layer: int, q: torch.Tensor) -> LseState:
        """The layer's region lse of its previous steps (kernels.LseState)."""
        state = self.lse_state.get(layer)
        if state is None or state.lse.shape[1:] != q.shape[:2] or state.lse.device != q.device:
            state = LseState.empty(q.shape[0], q.shape[1], q.device)
            self.lse_state[layer] = state
        return state


def _top_columns(x: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] column indices of each row's k largest, in no promised order: kernels.
    select_topk on a GPU (one launch for the few short rows of a re-rank; increasing),
    torch.topk elsewhere."""
    if x.is_cuda:
        return select_topk(x, k)
    return x.topk(k, dim=-1, sorted=False).indices


def _top_blocks(sums: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] indices of each row's k largest block sums (>= -1: no -inf), in no order:
    kernels.topk_indices on a GPU (a few launches, where torch.topk's ~15 small ones each
    wait for the SMs beside a decode step's matmuls), torch.topk elsewhere."""
    if sums.is_cuda:
        return topk_indices(sums, k)
    return sums.topk(k, dim=-1, sorted=False).indices


def _top_columns_with(x: torch.Tensor, k: int, values: torch.Tensor, always: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """_top_columns of x [R, C] then the always columns C .. C + always - 1, and values
    [R, C + always] at them -> ([R, k + always], [R, k + always]): kernels.
    select_topk_values on a GPU, torch.topk elsewhere."""
    if x.is_cuda:
        return select_topk_values(x, k, values, always)
    extra = torch.arange(x.shape[1], x.shape[1] + always, device=x.device)
    cols = torch.cat([_top_columns(x, k), extra.expand(x.shape[0], always)], dim=1)
    return cols, values.gather(1, cols)


def _take_rows(keys: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """keys [R, C, D] rows at take [R, K] -> [R, K, D]: one gather_kv launch on a GPU
    (a device source)."""
    if keys.is_cuda:
        return gather_k(keys, take)
    return keys.gather(1, take[..., None].expand(-1, -1, keys.shape[2]))
