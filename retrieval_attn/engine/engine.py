"""Engine: a request (or a batch of equal-length ones) through prefill and decode."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from retrieval_attn.config import EngineConfig, IndexConfig, KVConfig, check_for_shape
from retrieval_attn.engine.runner import ModelRunner
from retrieval_attn.errors import ConfigError, RequestError
from retrieval_attn.model.loader import LoadedModel
from retrieval_attn.model.spec import ModelSpec
from retrieval_attn.offload.make import make_kv_policy
from retrieval_attn.offload.policy import KVPolicy
from retrieval_attn.sampling import RequestSampler, SamplingParams

LOG = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


def check_for_model(config: EngineConfig, spec: ModelSpec, source: str) -> None:
    """Cross checks of a config against the model's shape (config.py checks each setting
    alone): run as soon as the shape is known, before the weights load and any prefill."""
    if spec.sliding_window is not None and config.runtime.max_context_tokens > spec.sliding_window:
        raise ConfigError(f"{source} uses sliding-window attention over "
                          f"{spec.sliding_window} tokens, which this engine does not "
                          f"implement: set runtime.max_context_tokens <= "
                          f"{spec.sliding_window}")
    check_for_shape(config.kv, spec.num_layers, spec.head_dim, source)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        check_for_model(config, loaded.spec, loaded.source)
        config = config.for_shape(loaded.spec.head_dim)  # kv.rank a number
        self.loaded, self.config = loaded, config
        spec, rt = loaded.spec, config.runtime
        self.max_tokens = rt.max_context_tokens
        if self.max_tokens > spec.max_position_embeddings:
            LOG.warning("runtime.max_context_tokens %d exceeds the %d positions %s was "
                        "trained for: expect degraded output past that length",
                        self.max_tokens, spec.max_position_embeddings, loaded.source)
        self.kv = self.make_policy(config.kv, config.index)
        self.runner = ModelRunner(loaded.model, self.kv, self.max_tokens,
                                  rt.prefill_chunk_tokens, rt.cuda_graphs and self.kv.graph_safe,
                                  rt.max_batch)

    def make_policy(self, kv: KVConfig, index: IndexConfig | None = None) -> KVPolicy:
        """A KV policy for this model; index None = the low-rank retriever (no host index)."""
        spec, weight = self.loaded.spec, self.loaded.model.embed.weight
        rt = self.config.runtime
        policy = make_kv_policy(kv, spec.num_layers, spec.num_heads, spec.num_kv_heads,
                                spec.head_dim, self.max_tokens, weight.device, weight.dtype,
                                index, rt.progress_bar, rt.max_batch)
        # the guessed layers' int8 query weights; a policy without lookahead frees them
        self.loaded.model.prepare_guesses(kv.lookahead_from if kv.policy == "retrieval" else 0)
        return policy

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token of text")
        if len(prompt_ids) >= self.max_tokens:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens but runtime.max_context_tokens is "
                f"{self.max_tokens} (prompt + new tokens): shorten the prompt or raise "
                "runtime.max_context_tokens in the config")
        vocab = self.loaded.spec.vocab_size
        bad = [i for i in prompt_ids if not 0 <= i < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def prefill(self, prompt_ids: list[int], stats: GenerationStats,
                seq: int = 0) -> torch.Tensor:
        """Run the prompt into the KV policy (as sequence seq of a batch) -> its last
        logits [V]."""
        self.check_prompt(prompt_ids)
        rt = self.config.runtime
        stats.prompt_tokens = len(prompt_ids)
        progress = rt.progress_bar and len(prompt_ids) >= rt.progress_bar_min_tokens
        t0 = time.perf_counter()
        self.kv.start_request(len(prompt_ids), seq=seq)
        logits = self.runner.prefill(prompt_ids, progress=progress)
        self.kv.finish_prefill(len(prompt_ids))
        stats.prefill_s = time.perf_counter() - t0
        return logits

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams,
                     stats: GenerationStats) -> Iterator[int]:
        """Yield new token ids; stats is filled in as the request runs."""
        logits = self.prefill(prompt_ids, stats)
        yield from self.decode(logits, len(prompt_ids), params, stats)

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                       stats: list[GenerationStats]) -> list[list[int]]:
        """New token ids of each prompt, decoded together: one forward per step for all
        of them. Prompts must have one length (they decode in lockstep) and be at most
        runtime.max_batch; stats[i] is filled in for prompt i."""
        B = self.runner.batch
        if not 1 <= len(prompts) <= B:
            raise RequestError(f"{len(prompts)} prompts in one batch, runtime.max_batch is "
                               f"{B}: split the batch or raise runtime.max_batch")
        n = len(prompts[0])
        if any(len(p) != n for p in prompts):
            raise RequestError("batched prompts decode in lockstep and must have one "
                               f"length; got {sorted({len(p) for p in prompts})} tokens")
        last = [self.prefill(ids, stats[seq], seq) for seq, ids in enumerate(prompts)]
        samplers = [RequestSampler(params, self._eos(), self.max_tokens, s) for s in stats]
        out: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        t1, pos = time.perf_counter(), n
        tokens = [0] * len(prompts)
        while True:
            for seq in live:  # drawn only while live: as the sequence alone
                tokens[seq] = samplers[seq].sample(last[seq])
            for seq in list(live):
                if samplers[seq].accept(tokens[seq], pos):
                    out[seq].append(tokens[seq])
                if samplers[seq].done:
                    live.remove(seq)
            if not live:
                break
            # finished and unused rows decode a token too: the step's shape is fixed
            fed = tokens + [tokens[live[0]]] * (B - len(tokens))
            last = list(self.runner.decode_batch(fed, pos)[:len(prompts)])
            pos += 1
        for s in stats:
            s.decode_s = time.perf_counter() - t1
        return out

    def generate_from_context(self, ctx, params: SamplingParams, stats: GenerationStats,
                              suffix: list[int] | tuple[int, ...] = ()) -> Iterator[int]:
        """Like generate_ids, with the prompt's KV state loaded from a saved context; suffix
        (token ids) is fed after it one decode step a token (a question asked of a shared
        document: it attends to the context as decoded tokens do, through the policy)."""
        from retrieval_attn.context import restore_context

        pos = len(ctx.prompt_token_ids)
        if suffix:
            self.check_prompt(list(ctx.prompt_token_ids) + list(suffix))
        t0 = time.perf_counter()
        logits = restore_context(self, ctx)
        for token in suffix:
            logits = self.runner.decode(token, pos)
            pos += 1
        stats.prompt_tokens, stats.prefill_s = pos, time.perf_counter() - t0
        yield from self.decode(logits, pos, params, stats)

    def _eos(self) -> set[int]:
        tokenizer = self.loaded.tokenizer
        return set() if tokenizer is None else tokenizer.eos_token_ids

    def decode(self, logits: torch.Tensor, pos: int, params: SamplingParams,
               stats: GenerationStats, kv: KVPolicy | None = None) -> Iterator[int]:
        """Sample from the prompt's last logits [V], then decode until a stop.

        pos is the prompt length; kv, if given, replaces the engine's policy for these
        steps (used to compare policies on one prefill).
        """
        sampler = RequestSampler(params, self._eos(), self.max_tokens, stats)
        own_kv = self.runner.kv
        if kv is not None:
            self.runner.kv = kv
        t1 = time.perf_counter()
        try:
            token = sampler.sample(logits)
            while True:
                if sampler.accept(token, pos):
                    yield token
                if sampler.done:
                    break
                token = sampler.sample(self.runner.decode(token, pos))
                pos += 1
                stats.decode_s = time.perf_counter() - t1
        finally:
            self.runner.kv = own_kv
            stats.decode_s = time.perf_counter() - t1
