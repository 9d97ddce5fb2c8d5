"""SamplingParams (per request) and the sampler."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from retrieval_attn.errors import RequestError

if TYPE_CHECKING:
    from retrieval_attn.engine.engine import GenerationStats


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much mass
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None  # fixes the random draws of temperature sampling
    # text that ends generation (not returned): a string, a list of them, or None (none)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)

    def __post_init__(self) -> None:
        stop = [] if self.stop is None else self.stop  # None: no stop strings (as in vLLM)
        if isinstance(stop, str):
            stop = [stop]
        if isinstance(stop, tuple):
            stop = list(stop)
        object.__setattr__(self, "stop", stop)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens is {self.max_tokens!r}: it must be an integer >= 1")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise RequestError(f"temperature is {self.temperature!r}: it must be a finite "
                               "number >= 0 (0 means greedy decoding)")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p is {self.top_p!r}: it must be a number in (0, 1] "
                               "(1 keeps every token)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k is {self.top_k!r}: it must be an integer >= 0 "
                               "(0 keeps every token)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise RequestError(f"seed is {self.seed!r}: it must be an integer in [0, 2**64) "
                               "or None (unseeded)")
        if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
            raise RequestError(f"stop is {self.stop!r}: it must be a string or a list of "
                               "non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos is {self.ignore_eos!r}: it must be True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> int:
    """logits [V] -> one token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class RequestSampler:
    """One request's draws and stop: its sampler's generator, its stop tokens, its token
    budget and its stats, the same for a request decoded alone or in a batch."""

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
