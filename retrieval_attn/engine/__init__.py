"""The request loop (engine) and the forward runner (prefill chunks, graphed decode)."""

from .engine import Engine, GenerationStats
from .runner import ModelRunner
from .text import TextAssembler

__all__ = ["Engine", "GenerationStats", "ModelRunner", "TextAssembler"]
