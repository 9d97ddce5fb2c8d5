"""Sequence: one request's decoding state, the same for a sequence decoded alone or in a
batch: its sampler's generator, its stop tokens, its token budget and its stats."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from retrieval_attn.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from retrieval_attn.engine.engine import GenerationStats


class Sequence:
    def __init__(self, params: SamplingParams, eos: set[int], max_positions: int,
                 stats: GenerationStats) -> None:
        self.params, self.stats = params, stats
        self.eos = set() if params.ignore_eos else eos
        self.max_positions = max_positions  # runtime.max_context_tokens
        # a generator of its own: a seeded request samples the same tokens alone or
        # beside others
        self.gen = (torch.Generator().manual_seed(params.seed)
                    if params.seed is not None else None)
        self.done = False

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from logits [V]."""
        return sample(logits, self.params, self.gen)

    def accept(self, token: int, pos: int) -> bool:
        """Record a token sampled with pos positions before it -> whether it is output
        (an end-of-sequence token is not). Sets done, and stats.finish_reason "stop" (end
        of sequence) or "length" (max_tokens, or the context is full)."""
        if token in self.eos:
            self.stats.finish_reason, self.done = "stop", True
            return False
        self.stats.generated_tokens += 1
        if (self.stats.generated_tokens >= self.params.max_tokens
                or pos + 1 >= self.max_positions):
            self.stats.finish_reason, self.done = "length", True
        return True
