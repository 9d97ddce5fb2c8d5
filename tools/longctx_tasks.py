"""Cheap long-context tasks in the style of RULER, built on the shipped haystack.

Each task makes a chat prompt of about `length` tokens and scores an answer in [0, 1]
by string match (RULER's "all" metric: the share of expected strings in the answer).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from retrieval_attn.tools.niah import haystack_text

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


@dataclass
class Sample:
    task: str
    length: int
    depth: float | None  # where the facts sit (single-needle task), else None
    question: str
    facts: list[str]  # sentences hidden in the haystack, in order
    expected: list[str]  # strings the answer must contain

    def score(self, answer: str) -> float:
        return sum(e in answer for e in self.expected) / len(self.expected)


def _num(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3))


def niah(rng: random.Random, length: int, depth: float) -> Sample:
    value = _num(rng)
    return Sample("niah", length, depth,
                  "What is the special magic number mentioned in the essays above? "
                  "Answer with the number only.",
                  [f"The special magic number mentioned in these essays is {value}."], [value])


def multikey(rng: random.Random, length: int) -> Sample:
    keys = [_word(rng) for _ in range(4)]
    values = [_num(rng) for _ in keys]
    ask = rng.randrange(len(keys))
    facts = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values,
                                                                          strict=True)]
    return Sample("multikey", length, None,
                  f"What is the special magic number for {keys[ask]} mentioned in the essays "
                  "above? Answer with the number only.", facts, [values[ask]])


def multivalue(rng: random.Random, length: int) -> Sample:
    key, values = _word(rng), [_num(rng) for _ in range(3)]
    facts = [f"One of the special magic numbers for {key} is {v}." for v in values]
    return Sample("multivalue", length, None,
                  f"What are all the special magic numbers for {key} mentioned in the essays "
                  "above? List every one of them.", facts, values)


def vartrack(rng: random.Random, length: int) -> Sample:
    names = [_word(rng).upper() for _ in range(3)]
    value = str(rng.randint(10000, 99999))
    facts = [f"VAR {names[0]} = {value}."]
    facts += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    return Sample("vartrack", length, None,
                  f"Which variables are assigned the value {value}, directly or through other "
                  "variables? List all of their names.", facts, names)


def multiquery(rng: random.Random, length: int) -> Sample:
    """RULER's multi-query NIAH: four keys, all asked for at once."""
    keys = [_word(rng) for _ in range(4)]
    values = [_num(rng) for _ in keys]
    facts = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values,
                                                                          strict=True)]
    return Sample("multiquery", length, None,
                  f"What are the special magic numbers for {', '.join(keys[:-1])} and "
                  f"{keys[-1]} mentioned in the essays above? Answer with the four numbers.",
                  facts, values)


def extract(rng: random.Random, length: int) -> Sample:
    """Multi-field extraction (Text2JSON-like): five facts about one person, scattered
    through the document, returned together as one JSON object. Low-rank key methods are
    reported to lose exactly this kind of task (DESIGN.md, anchors)."""
    name = _word(rng).capitalize() + " " + _word(rng).capitalize()
    fields = {"badge": _num(rng), "room": f"{rng.randint(100, 999)}{rng.choice('ABCDEF')}",
              "manager": _word(rng).capitalize() + " " + _word(rng).capitalize(),
              "project": f"{_word(rng).upper()}-{rng.randint(10, 99)}",
              "city": rng.choice(["Lisbon", "Oslo", "Tucson", "Nagoya", "Quito", "Leeds",
                                  "Perth", "Tartu", "Cusco", "Malmo"])}
    facts = [f"{name}'s badge number is {fields['badge']}.",
             f"{name} works in room {fields['room']}.",
             f"{name}'s manager is {fields['manager']}.",
             f"{name} is assigned to project {fields['project']}.",
             f"{name} moved here from {fields['city']}."]
    return Sample("extract", length, None,
                  f"Return everything the essays above say about {name} as one JSON object "
                  "with the keys badge, room, manager, project and city. Answer with the "
                  "JSON only.", facts, list(fields.values()))


def cwe(rng: random.Random, length: int) -> Sample:
    """Common words: a numbered word list where 5 words repeat often; no essay filler."""
    common = [_word(rng) for _ in range(5)]
    return Sample("cwe", length, None,
                  "What are the 5 most common words in the list above? Answer with the words.",
                  common, common)


def render(sample: Sample, encode: Encode, decode: Decode, rng: random.Random,
           overhead_tokens: int) -> str:
    """The user message: filler with the facts spread in, then the question."""
    budget = max(sample.length - overhead_tokens, 64)
    if sample.task == "cwe":
        return _word_list(sample, encode, budget, rng) + "\n\n" + sample.question
    filler = decode(encode(haystack_text(budget * 8))[:budget - 40 * len(sample.facts)])
    if sample.depth is not None:
        depths = [sample.depth]
    else:
        depths = sorted(rng.uniform(0.05, 0.95) for _ in sample.facts)
    cuts = [_sentence_cut(filler, d) for d in depths]
    text, prev = "", 0
    for cut, fact in zip(cuts, sample.facts, strict=True):
        text += filler[prev:cut] + fact + " "
        prev = cut
    return text + filler[prev:] + "\n\n" + sample.question


def _sentence_cut(text: str, depth: float) -> int:
    at = int(len(text) * depth)
    boundary = text.rfind(". ", 0, at)
    return boundary + 2 if boundary != -1 else at


def _word_list(sample: Sample, encode: Encode, budget: int, rng: random.Random) -> str:
    rare_pool = [_word(rng) for _ in range(2000)]
    words: list[str] = []
    n_tokens = 0
    while n_tokens < budget:
        chunk = [rng.choice(sample.facts) if rng.random() < 0.1 else rng.choice(rare_pool)
                 for _ in range(100)]
        words += chunk
        n_tokens = len(encode(" ".join(f"{i + 1}. {w}" for i, w in enumerate(words))))
    while len(words) > 10 and len(encode(" ".join(f"{i + 1}. {w}" for i, w in
                                                  enumerate(words)))) > budget:
        words = words[: int(len(words) * 0.97)]
    return "Below is a numbered list of words.\n" + " ".join(
        f"{i + 1}. {w}" for i, w in enumerate(words))


def make_samples(lengths: list[int], depths: list[float], per_task: int,
                 seed: int, niah_per_depth: int = 1) -> list[Sample]:
    """NIAH: niah_per_depth needles per depth; other tasks: per_task samples each, per
    length. The same arguments give the same samples."""
    rng = random.Random(seed)
    samples = []
    for length in lengths:
        samples += [niah(rng, length, d) for d in depths for _ in range(niah_per_depth)]
        for make in (multikey, multivalue, vartrack, cwe, multiquery, extract):
            samples += [make(rng, length) for _ in range(per_task)]
    return samples
