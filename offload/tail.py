"""TailEstimate: the attention the top-k leaves out, estimated on the GPU and added back.

Top-k attention drops every token outside window ∪ selected and renormalises over what is
left. Where a head's attention is diffuse, the dropped tail is a real share of the softmax
mass (measured on SmolLM2 at 4K with top_k 5%: 3.5% on average, 29% in layer 0), and
renormalising without it changes the output enough to lose needle answers that exact
attention gets right. Even the exact top-k (re-ranking every key) loses them.

The estimate uses what is already on the GPU: the low-rank key sketch scores every
offloaded token, and per-chunk sums of V (CHUNK tokens per chunk; V itself is on the host)
stand in for the values of the tokens not attended exactly:

    tail_h = sum over chunks c of  m_hc · mean_v_c,   m_hc = sum_{i in c, i not attended}
                                                             exp(s~_hi · scale - lse_h)

where s~ are sketch scores and lse_h the head's log-sum-exp over window and sketched
region (what the retriever ranked with). The exact part (window ∪ selected: out_h, with
log-sum-exp lse_att_h from the attention kernel) and the tail are merged as two softmax
partials: out = (out_h + r_h tail_h) / (1 + r_h sum_c m_hc), r_h = exp(lse_h - lse_att_h).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from retrieval_attn.index.base import Selection
from retrieval_attn.kernels.append_token import add_to_tail
from retrieval_attn.kernels.formats import ChunkTail, TailLayer
from retrieval_attn.kernels.tail_correct import (
    SPLITS,
    guess_lse_ref,
    tail_correct_ref,
    tail_merge,
    tail_partials,
)

if TYPE_CHECKING:
    from retrieval_attn.offload.lowrank import LowRankKeys

CHUNK = 64  # tokens per value chunk: V sums take 1/CHUNK of V's rows on the GPU
Merge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # merge(out, lse_att) -> out


def sums_dtype(value_bytes: int) -> torch.dtype:
    """The chunk sums' dtype for values of value_bytes bytes (the planner has only the
    size): bfloat16 for 16-bit values (V's own
    precision, and the range of float32 where a float16 sum of 64 could overflow), else
    float32. Every read (the scoring pass, the tail's kernels) sums in float32; bfloat16
    halves the bytes the scoring pass reads beside the sketch (16 of 80 MiB a layer at
    256K Llama with an int4 rank-64 sketch) and the sums' GPU memory."""
    return torch.bfloat16 if value_bytes == 2 else torch.float32


def padded_chunks(max_tokens: int) -> int:
    """Chunks held per row: ceil(N / CHUNK), rounded up to a multiple of SPLITS."""
    return -(-max_tokens // (CHUNK * SPLITS)) * SPLITS


class TailEstimate:
    """sums [L, R, M, D] sums_dtype(kv_dtype.itemsize): V summed over each chunk of CHUNK positions,
    per kv-head row (R = batch · Hkv), on the device; M = padded_chunks(N) (the padding
    stays 0). A prompt's sums are made in float32 and rounded once; a decode token is added
    in float32 and the sum rounded again (a bfloat16 chunk filled at decode carries up to
    CHUNK roundings of 2**-9 of its size: far below the estimate's own error)."""

    def __init__(self, num_layers: int, rows: int, max_tokens: int, head_dim: int,
                 device: torch.device, kv_dtype: torch.dtype = torch.float32) -> None:
        self.M = padded_chunks(max_tokens)
        self.sums = torch.zeros(num_layers, rows, self.M, head_dim,
                                dtype=sums_dtype(kv_dtype.itemsize), device=device)
        # the last position appended per layer and row: a CUDA graph capture runs the
        # decode step more than once at one position (warm-up, then replay), and a sum must
        # not count a token twice (every other decode-time write overwrites). Per row, so
        # that the fused append's programs (one a row) never race on it.
        self.last_pos = torch.full((num_layers, rows), -1, dtype=torch.long, device=device)
        self.scale = head_dim**-0.5  # of the attention scores
        self.side: torch.cuda.Stream | None = None  # estimate_beside's partials run on it

    def build(self, layer: int, v: torch.Tensor, heads: slice = slice(None)) -> None:
        """A prompt's values v [heads, n, D]: the chunk sums of those heads."""
        rows, n, d = v.shape
        m = -(-n // CHUNK)
        padded = torch.zeros(rows, m * CHUNK, d, dtype=torch.float32, device=self.sums.device)
        padded[:, :n] = v.to(self.sums.device, torch.float32)
        sums = self.sums[layer, heads]  # a view
        sums.zero_()
        sums[:, :m] = padded.view(rows, m, CHUNK, d).sum(dim=2)  # rounded once
        self.last_pos[layer, heads] = -1

    def layer(self, layer: int) -> TailLayer:
        """One layer's sums and last positions (views), as kernels.append_token adds to them."""
        return TailLayer(self.sums[layer], self.last_pos[layer], CHUNK)

    def append(self, layer: int, pos: torch.Tensor, v: torch.Tensor) -> None:
        """v [R, 1, D] of the token at position pos ([1] on the device; no sync). Appending
        the same position again (a graph's warm-up and replay) adds nothing. A decode step
        appends through kernels.append_token instead."""
        add_to_tail(pos, v[:, 0], self.layer(layer))

    def start(self, layer: int, mass: torch.Tensor | ChunkTail, total_lse: torch.Tensor,
              selected: torch.Tensor, selected_scores: torch.Tensor, count: torch.Tensor,
              pos: torch.Tensor, scale: float, guess_window_lse: torch.Tensor | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Begin adding the estimated tail to a decode step (kernels.tail_correct); returns
        merge(out, lse_att) -> out [R, G, D] in out's dtype, with out [R, G, D] and
        lse_att [R, G] the attention over window ∪ selected (exact).

        mass [R, G, ceil(N / CHUNK)]: per head, sum over each chunk's positions in the
        sketched region of exp(sketch score · scale - total_lse) (kernels.select_scores
        with chunk=CHUNK), or on a GPU its chunk term already summed against this layer's
        sums (kernels.ChunkTail: select_scores with tail_sums=self.sums[layer], which a
        window of at least CHUNK tokens allows); total_lse [R, G] the retriever's
        log-sum-exp (window + sketched region). selected [R, K] positions attended
        exactly, selected_scores [R, G, K] their sketch scores, count [1] how many of the
        K are real.

        Where a guess at the query scored the sketch (lookahead; guess_window_lse [R, G]
        its lse over the window), the exact part's weight against the tail comes from the
        guess alone, lse_att unread: its lse over window ∪ selected, the selected by their
        sketch scores (kernels.guess_lse_ref), since the guess's scores do not share the
        real query's level.

        On a GPU the partial sums (everything but the merge) are launched here, before the
        exact attention exists, so a caller may run them on a side stream; elsewhere the
        reference runs whole at merge.
        """
        args = (mass, total_lse, selected, selected_scores, count, pos, self.sums[layer],
                scale, CHUNK)
        if not self.sums.is_cuda:  # the reference, not the interpreter
            if isinstance(mass, ChunkTail):
                raise ValueError("the tail's reference takes chunk masses, not partial sums")

            def merge_ref(out: torch.Tensor, lse_att: torch.Tensor) -> torch.Tensor:
                if guess_window_lse is not None:
                    lse_att = guess_lse_ref(guess_window_lse, selected_scores, count,
                                                    scale)
                return tail_correct_ref(out, lse_att, *args)
            return merge_ref
        parts = tail_partials(*args)
        return lambda out, lse_att: tail_merge(out, lse_att, parts, guess_window_lse)

    def estimate(self, layer: int, found: Selection, sketch: LowRankKeys, pos: torch.Tensor,
                 guess_window_lse: torch.Tensor | None = None) -> Merge | None:
        """`start` for a decode step's selection, on the current stream: its chunk mass
        and total lse from the retriever's scoring pass, its positions' sketch scores
        (scored as the pass scored them) -> merge(out, lse_att), or None where the
        selection scored no sketch this step (nothing to estimate). found: the retriever's
        answer for this layer, positions [R, K]; pos [1] the step's position."""
        if not scored(found):
            return None
        sel = found.positions
        scores = sketch.scores_at(layer, found.query, sel)  # [R, G, K]
        return self.start(layer, found.mass, found.total, sel, scores, found.count, pos,
                          self.scale, guess_window_lse)

    def estimate_beside(self, layer: int, found: Selection, sketch: LowRankKeys,
                        pos: torch.Tensor, guess_window_lse: torch.Tensor | None = None
                        ) -> Merge | None:
        """`estimate` on a side stream (on a GPU), beside the value gather (host reads,
        which leave the SMs idle); the merge it returns joins that stream first (the fork
        and join are captured by a CUDA graph too)."""
        if not found.positions.is_cuda:
            return self.estimate(layer, found, sketch, pos, guess_window_lse)
        if not scored(found):
            return None
        main = torch.cuda.current_stream()
        if self.side is None:
            self.side = torch.cuda.Stream(found.positions.device)
        side = self.side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            merge = self.estimate(layer, found, sketch, pos, guess_window_lse)

        def finish(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
            main.wait_stream(side)
            return merge(out, lse)

        return finish

    def memory_bytes(self) -> dict[str, int]:
        n = self.sums.numel() * self.sums.element_size()
        return {"gpu" if self.sums.is_cuda else "host": n}


def scored(found: Selection) -> bool:
    """Whether a selection scored the sketch this step: a tail to estimate."""
    return found.total is not None and found.mass is not None
