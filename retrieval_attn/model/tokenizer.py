"""Tokenizer and chat template from the model's own files (HF tokenizers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval_attn.errors import RequestError


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, extra_eos_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        eos = {hf_tokenizer.eos_token_id, *extra_eos_ids}
        self.eos_token_ids = frozenset(i for i in eos if i is not None)

    @classmethod
    def from_dir(cls, path: Path, extra_eos_ids: tuple[int, ...] = ()) -> Tokenizer | None:
        """The tokenizer saved beside a checkpoint, or None when it has none."""
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), extra_eos_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.hf.chat_template:
            raise RequestError("this model's tokenizer has no chat template: pass a plain "
                               "string prompt instead of chat messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RequestError(f"chat message {m!r} must be a dict with 'role' and "
                                   "'content'")
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    raise RequestError(f"chat message {m!r}: its {key!r} is "
                                       f"{type(m[key]).__name__}; it must be a string")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already writes any BOS it wants.
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
