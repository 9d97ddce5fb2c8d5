"""LookaheadSelect: SparseKV choosing a layer's candidates early (kv.lookahead_from).

In a decode step the model hands the policy, as layer - 1 starts, a guess at layer's
queries (computed from layer - 1's input: the residual stream changes little from one
layer to the next). The low-rank retriever's first half (sketch scoring, candidate top-k,
the host reads of the candidates' keys) then runs on a side stream beside layer - 1: its
HBM-bound scoring beside that layer's latency-bound value reads, its key reads beside the
MLP. attend(layer) waits for that layer's event only and re-ranks the candidates with the
real queries. SparseKV holds the state (selector, window, cfg, _ahead, _ahead_stream);
this class is its methods on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from retrieval_attn.index.base import Selection
from retrieval_attn.index.retriever import Candidates, LowRankRetriever
from retrieval_attn.offload.policy import AttnStep


class Lookahead(NamedTuple):
    """A layer's candidates chosen early (SparseKV.lookahead)."""

    step: AttnStep  # the decode step they were chosen for
    found: Candidates | Selection  # LowRankRetriever.candidates' answer
    window_lse: torch.Tensor  # [B·Hkv, G] the guess's over the window (the tail's weight)
    done: torch.cuda.Event | None  # recorded on the side stream when they are ready
    # without a re-rank (kv.rerank_factor 1) the guess's choice is final, and the side
    # stream also read it: (K, V [B·Hkv, K, D], or None, None where the attention reads
    # them from the store by index; the tail's merge(out, lse), or None without a tail)
    ready: tuple | None = None


class LookaheadSelect:
    """Mixed into SparseKV: lookahead and its join (module docstring)."""

    def lookahead(self, layer: int, guess: Callable[[], torch.Tensor], step: AttnStep) -> None:
        """Choose layer's re-rank candidates now, with guess() -> q [B, H, 1, D] (its
        queries as computed from layer - 1's input), for attend(layer) to re-rank with the
        real ones (kv.lookahead_from; offload/policy.py). On a GPU it all runs on a side
        stream beside layer - 1: the sketch scoring (HBM-bound) beside layer - 1's value
        reads from the host, then the top-k and the host reads of the candidates' keys
        beside its MLP. The window's lse leaves out this step's token (not written yet),
        and the layer's tail estimate is the guess's (_start_tail): approximations of the
        guess, checked against dense attention (docs/results.md). Without a re-rank
        (kv.rerank_factor 1) the guess's choice is final: the side stream then also reads
        the chosen K, V and computes the tail's partial sums, and attend(layer) is left the
        attention and the merges."""
        if (self.prefill_kv is not None or not 0 < self.cfg.lookahead_from <= layer
                or not isinstance(self.selector, LowRankRetriever)):
            return

        def choose() -> Lookahead:
            q = guess()  # [B, H, 1, D]
            qg = q[:, :, 0].reshape(q.shape[0] * self.Hkv, self.H // self.Hkv, self.D)
            # the slot this step's token goes to holds an older token until attend(layer)
            # (or already this one, when a graph's capture repeats the step): left out
            hi, window, newest = self._step_bounds(layer, step)
            sel, window_lse = self.selector, self.window_lse(layer, qg, window, newest)
            found = sel.candidates(layer, qg, self.cfg.sink_tokens, hi, self.budget,
                                   window_lse, self.cfg.lookahead_sm_share)
            ready = None
            if not isinstance(found, Candidates):  # final: read it and start its tail now
                ready = (*self._read_selected(layer, found.positions),
                         self._tail_parts(layer, found, step.positions, window_lse))
            done = torch.cuda.Event() if qg.is_cuda else None
            if done is not None:
                done.record()
            return Lookahead(step, found, window_lse, done, ready)

        if self.device.type != "cuda":
            self._ahead[layer] = choose()
            return
        if self._ahead_stream is None:  # high priority: its few blocks of host reads
            # start as soon as any SM frees up, and wait on the link beside the MLP's
            self._ahead_stream = torch.cuda.Stream(self.device, priority=-1)
        self._ahead_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._ahead_stream):
            self._ahead[layer] = choose()

    def _join_lookahead(self, ahead: Lookahead, qg: torch.Tensor, hi: torch.Tensor
                        ) -> Selection:
        """attend's selection from the candidates lookahead chose (its sketch scores, for
        the tail, are the guess's)."""
        if ahead.done is not None:  # this layer's lookahead only: the next one runs on
            torch.cuda.current_stream().wait_event(ahead.done)
        if isinstance(ahead.found, Candidates):
            return self.selector.rerank(qg, hi, ahead.found)
        return ahead.found
