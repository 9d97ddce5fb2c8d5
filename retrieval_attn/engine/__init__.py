"""The request loop (engine) and the forward runner (prefill chunks, graphed decode)."""

from retrieval_attn.engine.engine import Engine, GenerationStats
from retrieval_attn.engine.runner import ModelRunner
from retrieval_attn.engine.text import TextAssembler

__all__ = ["Engine", "GenerationStats", "ModelRunner", "TextAssembler"]
