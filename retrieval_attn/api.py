"""LLM: the public entry point, shaped like vLLM's."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retrieval_attn.config import EngineConfig
from retrieval_attn.context import SavedContext, check_target, open_context, save_context
from retrieval_attn.engine import Engine, GenerationStats, TextAssembler
from retrieval_attn.engine.engine import check_for_model
from retrieval_attn.errors import ConfigError, RequestError
from retrieval_attn.index.ann_retriever import require_index_modules
from retrieval_attn.model.loader import load_model
from retrieval_attn.planner import available_memory, check_budget, plan_memory, spec_for
from retrieval_attn.sampling import SamplingParams

LOG = logging.getLogger(__name__)

ChatMessages = list[dict[str, str]]
# A prompt is text, chat messages, {"prompt_token_ids": [...]} (pre-tokenized), or a
# saved context (LLM.load_context) whose KV state is loaded instead of prefilled.
Prompt = str | ChatMessages | dict[str, list[int]] | SavedContext


@dataclass
class Timings:
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    generated_tokens: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from prefill; decode steps make the rest
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0


@dataclass
class RequestOutput:
    prompt: Prompt
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens or context full
    timings: Timings = field(repr=False)


class LLM:
    """A Llama-family model behind a KV policy, loaded once, serving many requests.

    model: HF checkpoint dir, .gguf file, "random:<shape>", or None for the embedded
    SmolLM2. config: preset name, YAML path, dict or EngineConfig.
    """

    def __init__(self, model: str | Path | None = None,
                 config: str | Path | dict | EngineConfig = "default") -> None:
        cfg = EngineConfig.load(config)
        if model is not None:
            cfg = cfg.replace(model={"path": str(model)})
        self.device, self.dtype = _resolve_device(cfg.runtime.device, cfg.runtime.dtype)
        # Refuse now, with numbers, rather than run out of memory halfway through a prompt.
        spec = spec_for(cfg.model.path, cfg.model.cache_dir)
        check_for_model(cfg, spec, str(cfg.model.path or "the embedded model"))
        # the config this model runs: kv.rank None (half the head_dim) as a number, for
        # everything that reads it later (saved contexts record it)
        self.config = cfg = cfg.for_shape(spec.head_dim)
        if cfg.kv.policy == "retrieval" and cfg.index.kind != "lowrank":
            require_index_modules(cfg.index.kind)  # faiss, hnswlib: before the weights load
        check_budget(plan_memory(spec, cfg, self.device.type), *available_memory(self.device))
        self.loaded = load_model(cfg.model.path, self.device, self.dtype, cfg.model.cache_dir)
        self.tokenizer = self.loaded.tokenizer
        self.engine = Engine(self.loaded, cfg)

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts run one after another; with
        runtime.max_batch > 1, prompts of one token length decode together, up to
        max_batch at a time (stop strings then cut the text after decoding)."""
        params = _check_params(params)
        batch = _as_batch(prompts)
        ids = [self._encode(p) for p in batch]  # every prompt is checked before any runs
        for one in ids:
            self.engine.check_prompt(one)
        outputs: list[RequestOutput | None] = [None] * len(batch)
        for group in self._lockstep_groups(batch, ids):
            for i, out in zip(group, self._run_batch([batch[i] for i in group],
                                                     [ids[i] for i in group], params),
                              strict=True):
                outputs[i] = out
        return [out or self._run(p, i, params)
                for out, p, i in zip(outputs, batch, ids, strict=True)]

    def _lockstep_groups(self, batch: list[Prompt], ids: list[list[int]]) -> list[list[int]]:
        """Indices of prompts to decode together: same length, at most max_batch each."""
        size = self.config.runtime.max_batch
        if size == 1:
            return []
        by_len: dict[int, list[int]] = {}
        for i, (p, one) in enumerate(zip(batch, ids, strict=True)):
            if not isinstance(p, SavedContext):
                by_len.setdefault(len(one), []).append(i)
        return [g[s:s + size] for g in by_len.values() if len(g) > 1
                for s in range(0, len(g), size)]

    def _run_batch(self, prompts: list[Prompt], ids: list[list[int]],
                   params: SamplingParams) -> list[RequestOutput]:
        stats = [GenerationStats() for _ in prompts]
        new = self.engine.generate_batch(ids, params, stats)
        decode = self.tokenizer.decode if self.tokenizer else _no_text
        outputs = []
        for prompt, one, tokens, st in zip(prompts, ids, new, stats, strict=True):
            text, kept = TextAssembler(decode, params.stop), []
            for token in tokens:
                kept.append(token)
                text.add(token)
                if text.stopped:
                    st.finish_reason = "stop"
                    break
            timings = Timings(st.prefill_s, st.decode_s, st.prompt_tokens, len(kept))
            outputs.append(RequestOutput(prompt, one, text.text, kept,
                                         st.finish_reason or "stop", timings))
        return outputs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None
               ) -> Generator[str, None, RequestOutput]:
        """Yield text pieces of one prompt's answer as they are decoded; the generator's
        return value (StopIteration.value) is the whole RequestOutput: finish reason, timings."""
        params = _check_params(params)
        ids = self._encode(prompt)
        stats, new_ids, pieces = GenerationStats(), [], []
        for piece in self._pieces(ids, params, stats, new_ids, prompt):
            pieces.append(piece)
            yield piece
        return self._output(prompt, ids, "".join(pieces), new_ids, stats)

    def steps(self, prompt: Prompt, params: SamplingParams | None = None,
              after: SavedContext | None = None
              ) -> Generator[tuple[int | None, str], None, RequestOutput]:
        """Yield (token id, text piece) for each new token as it is decoded, for servers
        that count tokens and time each one. The piece is the text now safe to show, maybe
        '' (held back while it could start a stop string or ends in half a character);
        text still held when decoding ends comes last as (None, rest). The generator's
        return value is the whole RequestOutput; closing it early ends the request, and the
        engine is free for the next one. after: a saved context (load_context) the prompt
        continues: its KV state is loaded and the prompt's tokens are decoded on top."""
        params = _check_params(params)
        ids = self._encode(prompt)
        stats, new_ids, pieces = GenerationStats(), [], []
        for token, piece in self._steps(ids, params, stats, new_ids, prompt, after):
            pieces.append(piece)
            yield token, piece
        return self._output(prompt, ids, "".join(pieces), new_ids, stats)

    def save_context(self, prompt: Prompt, path: str | Path, overwrite: bool = False) -> Path:
        """Prefill a prompt and write its KV state (host store, low-rank keys, every
        layer's index, waiting for index builds) to the folder path. A folder that holds
        a saved context or other files is refused unless overwrite."""
        ids = self._encode(prompt)
        check_target(path, overwrite)  # before the prefill: a bad path loses no work
        logits = self.engine.prefill(ids, GenerationStats())
        return save_context(self.engine, ids, logits, path, overwrite)

    def load_context(self, path: str | Path) -> SavedContext:
        """Check a saved context (checksums, model shape, config); pass the result to
        generate() or stream() as the prompt."""
        return open_context(self.engine, path)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt exactly as generate() would feed them."""
        return self._encode(prompt)

    def _run(self, prompt: Prompt, ids: list[int], params: SamplingParams) -> RequestOutput:
        stats, new_ids = GenerationStats(), []
        text = "".join(self._pieces(ids, params, stats, new_ids, prompt))
        return self._output(prompt, ids, text, new_ids, stats)

    def _output(self, prompt: Prompt, ids: list[int], text: str, new_ids: list[int],
                stats: GenerationStats) -> RequestOutput:
        timings = Timings(stats.prefill_s, stats.decode_s, stats.prompt_tokens,
                          stats.generated_tokens)
        return RequestOutput(prompt, ids, text, new_ids, stats.finish_reason or "stop", timings)

    def _pieces(self, ids: list[int], params: SamplingParams, stats: GenerationStats,
                new_ids: list[int], prompt: Prompt | None = None) -> Iterator[str]:
        for _, piece in self._steps(ids, params, stats, new_ids, prompt):
            if piece:
                yield piece

    def _steps(self, ids: list[int], params: SamplingParams, stats: GenerationStats,
               new_ids: list[int], prompt: Prompt | None = None,
               after: SavedContext | None = None) -> Iterator[tuple[int | None, str]]:
        decode = self.tokenizer.decode if self.tokenizer else _no_text
        text = TextAssembler(decode, params.stop)
        if after is not None:
            gen = self.engine.generate_from_context(after, params, stats, suffix=ids)
        elif isinstance(prompt, SavedContext):
            gen = self.engine.generate_from_context(prompt, params, stats)
        else:
            gen = self.engine.generate_ids(ids, params, stats)
        for token in gen:
            new_ids.append(token)
            yield token, text.add(token)
            if text.stopped:
                gen.close()
                stats.finish_reason = "stop"
                break
        rest = text.flush()
        if rest:
            yield None, rest

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, SavedContext):
            return list(prompt.prompt_token_ids)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise RequestError(f"prompt_token_ids is a {type(ids).__name__}: give a list "
                                   "of integer token ids")
            bad = [i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool)]
            if bad:
                raise RequestError(f"prompt_token_ids holds {bad[:3]!r}: every token id must "
                                   "be an integer (tokenize text with LLM.encode, or pass the "
                                   "text itself)")
            return [int(i) for i in ids]
        if self.tokenizer is None:
            raise RequestError(f"{self.loaded.source} has no tokenizer: pass prompts as "
                               "{'prompt_token_ids': [...]}")
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty: give at least one character of text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt)
        raise RequestError(f"a prompt must be a string, a list of chat messages or "
                           f"{{'prompt_token_ids': [...]}}, not {type(prompt).__name__}")


def _check_params(params: Any) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        hint = (f"SamplingParams(**{params!r})" if isinstance(params, dict)
                else "SamplingParams(max_tokens=...)")
        raise RequestError(f"sampling params are a {type(params).__name__}: pass a "
                           f"SamplingParams, e.g. {hint}")
    return params


def _no_text(ids: list[int]) -> str:
    return ""


def _as_batch(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, (str, dict, SavedContext)):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError("prompts must be a prompt or a non-empty list of prompts")
    if all(isinstance(m, dict) and "role" in m for m in prompts):
        return [prompts]  # one chat, not a batch of dicts
    return list(prompts)


def _resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device is {device!r} but no CUDA device is available: "
                          "set runtime.device to cpu or auto")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)
