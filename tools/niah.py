"""Needle in a haystack: hide one fact in long filler text and ask the model for it.

Filler: Paul Graham's essays as packaged by the public NIAH test repository
(data/haystack/SOURCE.md). The prompt is a chat turn: haystack with the needle at a
relative depth, then the question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

from retrieval_attn import LLM, SamplingParams

NEEDLE = "The special magic number mentioned in these essays is {value}."
QUESTION = ("What is the special magic number mentioned in the essays above? "
            "Answer with the number only.")


@dataclass
class NiahResult:
    length: int  # requested prompt tokens
    depth: float  # where the needle sits, 0 = start, 1 = end
    prompt_tokens: int
    value: str
    answer: str
    prefill_tokens_per_s: float

    @property
    def found(self) -> bool:
        return self.value in self.answer


def haystack_text(min_chars: int) -> str:
    """Essays concatenated in a fixed order, repeated until at least min_chars long."""
    folder = resources.files("retrieval_attn.tools.data.haystack")
    essays = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")),
                    key=lambda f: f.name)
    parts: list[str] = []
    total = 0
    while total < min_chars:
        for f in essays:
            parts.append(f.read_text(encoding="utf-8").strip())
            total += len(parts[-1])
            if total >= min_chars:
                break
    return "\n\n".join(parts)


def build_prompt(llm: LLM, length: int, depth: float, value: str) -> list[dict[str, str]]:
    """Chat messages whose encoding is close to `length` tokens (a little under)."""
    needle = NEEDLE.format(value=value)
    overhead = len(llm.encode([{"role": "user", "content": f"{needle}\n\n{QUESTION}"}]))
    budget = max(length - overhead, 16)
    tok = llm.tokenizer
    filler_ids = tok.encode(haystack_text(min_chars=budget * 8))[:budget]
    filler = tok.decode(filler_ids)
    cut = int(len(filler) * depth)
    boundary = filler.rfind(". ", 0, cut)  # put the needle between sentences
    cut = boundary + 2 if boundary != -1 and depth < 1.0 else cut
    text = f"{filler[:cut]}{needle} {filler[cut:]}\n\n{QUESTION}"
    return [{"role": "user", "content": text}]


def run_niah(llm: LLM, length: int, depth: float = 0.5, seed: int = 0,
             max_tokens: int = 24) -> NiahResult:
    value = str(random.Random(f"{seed}-{length}-{depth}").randint(1_000_000, 9_999_999))
    messages = build_prompt(llm, length, depth, value)
    out = llm.generate(messages, SamplingParams(max_tokens=max_tokens))[0]
    return NiahResult(length, depth, len(out.prompt_token_ids), value, out.text.strip(),
                      out.timings.prefill_tokens_per_s)
