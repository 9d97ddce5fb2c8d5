"""Lookahead: a layer's re-rank candidates chosen one layer early (kv.lookahead_from).

In a decode step the model hands the policy, as layer - 1 starts, a guess at layer's
queries (computed from layer - 1's input: the residual stream changes little from one
layer to the next). The low-rank retriever's first half (sketch scoring, candidate top-k,
the host reads of the candidates' keys) then runs on a side stream beside layer - 1: its
HBM-bound scoring beside that layer's latency-bound value reads, its key reads beside the
MLP. attend(layer) waits for that layer's event only and re-ranks the candidates with the
real queries.

The policy (SparseKV.lookahead) says what to choose; a Lookahead runs it on its own
stream, keeps each layer's choice until attend takes it, and drops a choice left by an
interrupted step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from retrieval_attn.index.base import Selection
from retrieval_attn.index.retriever import Candidates
from retrieval_attn.offload.policy import AttnStep

Merge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # merge(out, lse) -> out


@dataclass(frozen=True)
class Ready:
    """A final choice (kv.rerank_factor 1) as the side stream read it."""

    # K, V [B·Hkv, K, D] of the chosen positions, or None, None where the attention reads
    # them from the store by index (an int8 store in GPU memory)
    keys: torch.Tensor | None
    values: torch.Tensor | None
    merge: Merge | None  # the tail's merge(out, lse), or None without a tail this step


@dataclass(frozen=True)
class AheadChoice:
    """A layer's candidates chosen early (SparseKV.lookahead)."""

    step: AttnStep  # the decode step they were chosen for
    found: Candidates | Selection  # LowRankRetriever.candidates' answer
    window_lse: torch.Tensor  # [B·Hkv, G] the guess's over the window (the tail's weight)
    # without a re-rank (kv.rerank_factor 1) the guess's choice is final, and the side
    # stream also read it
    ready: Ready | None = None
    done: torch.cuda.Event | None = None  # recorded on the side stream when it is ready


class Lookahead:
    """The choices made early, per layer, and the side stream that makes them."""

    def __init__(self, first_layer: int, device: torch.device) -> None:
        self.first_layer, self.device = first_layer, device
        self.pending: dict[int, AheadChoice] = {}  # layer -> its choice for attend
        self.stream: torch.cuda.Stream | None = None

    def covers(self, layer: int) -> bool:
        """Whether this layer's candidates are chosen early (kv.lookahead_from)."""
        return 0 < self.first_layer <= layer

    def start(self, layer: int, choose: Callable[[], AheadChoice]) -> None:
        """Run choose() now and keep its choice for take(layer). On a GPU it runs on the
        side stream, after the work queued so far on the current one, and an event marks
        the end of its work."""
        if self.device.type != "cuda":
            self.pending[layer] = choose()
            return
        if self.stream is None:  # high priority: its few blocks of host reads start as
            # soon as any SM frees up, and wait on the link beside the MLP's
            self.stream = torch.cuda.Stream(self.device, priority=-1)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            choice = choose()
            done = torch.cuda.Event()
            done.record()
            self.pending[layer] = dataclasses.replace(choice, done=done)

    def take(self, layer: int, step: AttnStep) -> AheadChoice | None:
        """This layer's choice for this step, or None. The current stream waits for that
        layer's work only (the next layer's runs on). A choice left by another step (one
        interrupted after its lookahead) is dropped."""
        choice = self.pending.pop(layer, None)
        if choice is None or choice.step is not step:
            return None
        if choice.done is not None:
            torch.cuda.current_stream().wait_event(choice.done)
        return choice
